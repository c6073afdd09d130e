"""The self-service of card holders (contract §7, the pages under /self): the domain side.

A holder, once logged in, reaches only their own: their purses and card (``holders``: the home
page's figures in one coalesced read), their statement (``statement``), their card's report
lost / found, PIN and their own daily limit (``cards``), and their dorm room's electricity
(``electricity``). ``SelfService`` ties them to one :class:`engine.campus.Campus`; the pages
(engine/web/self_*.py) call nothing else.
"""

from engine.selfservice.service import SelfService

__all__ = ["SelfService"]
