"""Server-rendered web pages: /self (card holders, contract §7) and /console (operators, §8).

One foundation for both: Jinja2 templates (``render``), gettext catalogs in zh-CN and English
(``i18n``), money shown and typed (``money``), server-side sessions (``sessions``), form tokens
(``csrf``), the gate every portal handler is behind (``gate``), login and logout (``login``,
asking ``auth.Verifier``), error pages (``errors``) and the stylesheet (``static``). The holders'
pages of /self are ``self_pages`` (what they read), ``self_forms`` (what they change) and
``self_activate`` (the first password), over the domain's engine/selfservice.
``routes.route_handlers()`` is what ``create_app`` includes.
"""
