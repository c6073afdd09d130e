"""What every browser test does with a page: find by id, follow a link or button to the next
page, read <html lang>. One copy, used by tests/web and tests/selfservice."""

from __future__ import annotations

from typing import Any

NEXT_PAGE_TIMEOUT_S = 10


def by_id(driver: Any, element_id: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def lang(driver: Any) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.TAG_NAME, "html").get_attribute("lang"))


def _gone(old: Any) -> Any:
    """A wait condition: ``old`` no longer belongs to the page. chromedriver answers a query on
    a node detached mid-query with a plain WebDriverException ("Node with given id does not
    belong to the document") rather than a stale-element error: that is gone too."""
    from selenium.common.exceptions import WebDriverException

    def check(_: Any) -> bool:
        try:
            old.is_enabled()
        except WebDriverException:
            return True
        return False

    return check


def follow(driver: Any, element_id: str) -> None:
    """Click a link or a button and wait until the next page has replaced this one."""
    click_through(driver, by_id(driver, element_id))


def click_through(driver: Any, element: Any) -> None:
    """Click ``element`` (a link or a button of the page) and wait for the next page."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    old = driver.find_element(By.TAG_NAME, "html")
    element.click()
    WebDriverWait(driver, NEXT_PAGE_TIMEOUT_S).until(_gone(old))
