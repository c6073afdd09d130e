"""The foundation in a real headless Chromium (Selenium): languages, the stylesheet under the
Content-Security-Policy, a refused form, a login and a logout. Screenshots of the login page
in both languages go to test-artifacts/screenshots/ (phone-sized window, 390x844)."""

from __future__ import annotations

from typing import Any

import pytest

from engine.web.portal import CONSOLE, SELF
from tests.web.browsing import by_id, follow, lang
from tests.web.conftest import PHONE, WebServer, new_user, screenshot

pytestmark = pytest.mark.browser


def _wait_for_url(driver: Any, url: str) -> None:
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.wait import WebDriverWait

    WebDriverWait(driver, 10).until(expected_conditions.url_to_be(url))


def _csp_violations(driver: Any) -> list[str]:
    return [
        e["message"]
        for e in driver.get_log("browser")
        if "Content Security Policy" in e["message"] or "Refused to" in e["message"]
    ]


def test_the_language_switch(browser: Any, web: WebServer) -> None:
    browser.get(web.base_url + SELF.login)
    assert lang(browser) == "zh-CN"
    assert by_id(browser, "login").text == "登录"
    screenshot(browser, "self-login-zh")
    follow(browser, "lang-switch")
    assert lang(browser) == "en"
    assert by_id(browser, "login").text == "Log in"
    assert browser.current_url.endswith("/self/login?lang=en")
    screenshot(browser, "self-login-en")
    browser.get(web.base_url + CONSOLE.login)  # remembered, on the other portal too
    assert lang(browser) == "en" and by_id(browser, "username")
    screenshot(browser, "console-login-en")
    follow(browser, "lang-switch")
    assert lang(browser) == "zh-CN" and by_id(browser, "login").text == "登录"
    screenshot(browser, "console-login-zh")


def test_the_stylesheet_loads_under_the_csp(browser: Any, web: WebServer) -> None:
    browser.get_log("browser")  # drop older entries
    browser.get(web.base_url + SELF.login)
    bar = browser.find_element("css selector", "header.bar")
    assert bar.value_of_css_property("background-color") == "rgba(11, 92, 173, 1)"
    button = by_id(browser, "login")
    assert float(button.value_of_css_property("min-height").removesuffix("px")) >= 48
    assert _csp_violations(browser) == []
    # one column on a phone: the field spans the main column
    assert browser.execute_script("return window.innerWidth") == PHONE[0]
    field = by_id(browser, "holder_id")
    assert field.size["width"] == PHONE[0] - 2 * 16  # the viewport less main's padding
    assert by_id(browser, "login").size["width"] == PHONE[0] - 2 * 16


def test_a_form_without_its_token_is_refused(browser: Any, web: WebServer) -> None:
    user = new_user(web)
    browser.get(web.base_url + SELF.login)
    by_id(browser, "holder_id").send_keys(user)
    by_id(browser, "password").send_keys("correct horse 1")
    # the driver (not the page: no script may run there) takes the token out of the form
    browser.execute_script("document.querySelector('input[name=csrf]').remove()")
    follow(browser, "login")
    page = by_id(browser, "error-page")
    assert page.get_attribute("data-status") == "403"
    assert page.get_attribute("data-reason") == "csrf"
    assert browser.get_cookie(SELF.cookie) is None  # no session
    screenshot(browser, "self-csrf-refused-zh")


def test_log_in_and_out(browser: Any, web: WebServer) -> None:
    user = new_user(web)
    browser.get(web.base_url + SELF.login)
    by_id(browser, "holder_id").send_keys(user)
    by_id(browser, "password").send_keys("wrong password")
    follow(browser, "login")
    assert by_id(browser, "error").get_attribute("data-error") == "wrong"
    assert by_id(browser, "holder_id").get_attribute("value") == user
    screenshot(browser, "self-login-error-zh")
    by_id(browser, "password").send_keys("correct horse 1")
    follow(browser, "login")
    _wait_for_url(browser, web.base_url + SELF.home)
    assert user in by_id(browser, "subject").text
    cookie = browser.get_cookie(SELF.cookie)
    assert cookie and cookie["httpOnly"] and cookie["sameSite"] == "Lax"
    follow(browser, "logout")
    _wait_for_url(browser, web.base_url + SELF.login)
    browser.get(web.base_url + SELF.home)
    assert browser.current_url == web.base_url + SELF.login  # the session is over
