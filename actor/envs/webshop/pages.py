"""The shop's pages in WebShop's ``text`` observation mode, without HTML.

The original renders Flask templates and flattens the visible text with `` [SEP] ``; verl-agent then
drops everything up to the instruction and quotes each piece. We build those pieces directly,
in the templates' order, and also the page's clickables in the order the original text env
collects them (buttons, then product links, then option radios; a later element with the same
lower-cased text replaces the earlier one, as its dict does).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .catalog import Catalog

PageKind = Literal["search", "results", "item", "tab", "done"]

PRODUCTS_PER_PAGE = 10  # engine.PRODUCT_WINDOW
BACK_TO_SEARCH, PREV_PAGE, NEXT_PAGE, BUY_NOW = "Back to Search", "< Prev", "Next >", "Buy Now"
TABS = ("Description", "Features", "Reviews")


@dataclass(frozen=True)
class PageState:
    """Where the browser is; everything the next page depends on."""

    kind: PageKind
    query: str = ""  # lower-cased search text (results, item and tab pages remember it for "< prev")
    page: int = 1  # results page number
    asin: str = ""  # product shown on item / tab / done pages
    options: tuple[tuple[str, str], ...] = ()  # chosen (option name, value), in click order
    tab: str = ""  # "description" | "features" | "reviews" on tab pages

    @property
    def chosen_options(self) -> dict[str, str]:
        return dict(self.options)

    def with_option(self, name: str, value: str) -> PageState:
        chosen = self.chosen_options
        chosen[name] = value
        return PageState("item", self.query, self.page, self.asin, tuple(chosen.items()))

    def key(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options))
        return f"{self.kind}|q={self.query}|p={self.page}|asin={self.asin}|opts={opts}|tab={self.tab}"


@dataclass(frozen=True)
class Clickable:
    kind: Literal["button", "product", "option"]
    value: str  # button label / asin / option value
    option_name: str = ""


@dataclass
class RenderedPage:
    pieces: list[str]  # visible texts after the instruction, in page order
    clickables: dict[str, Clickable] = field(default_factory=dict)  # lower-cased text -> element
    has_search_box: bool = False

    @property
    def text(self) -> str:
        """verl-agent's observation: each piece quoted, joined by [SEP]."""
        return " [SEP] ".join(f"'{p}'" for p in self.pieces)


def _buttons(page: RenderedPage, *labels: str) -> None:
    for label in labels:
        page.pieces.append(label)
        page.clickables[label.lower()] = Clickable("button", label)


def render(state: PageState, catalog: Catalog, score: float | None = None) -> RenderedPage:
    if state.kind == "search":
        page = RenderedPage(["Search"], has_search_box=True)
        page.clickables["search"] = Clickable("button", "Search")  # submit button: a no-op click
        return page
    if state.kind == "done":
        return RenderedPage(["Thank you for shopping with us!", "Your score (min 0.0, max 1.0)", f"{score}"])

    page = RenderedPage([])
    if state.kind == "results":
        hits = catalog.search(state.query)
        _buttons(page, BACK_TO_SEARCH)
        page.pieces.append(f"Page {state.page} (Total results: {len(hits)})")
        _buttons(page, *((PREV_PAGE, NEXT_PAGE) if state.page > 1 else (NEXT_PAGE,)))  # "next >" never ends
        start = (state.page - 1) * PRODUCTS_PER_PAGE
        shown = [catalog.by_asin[a] for a in hits[start : start + PRODUCTS_PER_PAGE]]
        for p in shown:
            page.pieces += [text.strip() for text in (p.asin, p.title, p.price_text) if text]
        for p in shown:
            page.clickables[p.asin.lower()] = Clickable("product", p.asin)
        return page

    product = catalog.by_asin[state.asin]
    _buttons(page, BACK_TO_SEARCH, PREV_PAGE)
    if state.kind == "tab":
        # an empty bullet still shows as '' (its template line has a leading space); an empty
        # description shows nothing; the 1k pack has no reviews (the original's list is empty too)
        if state.tab == "description" and product.description:
            page.pieces.append(product.description.strip())
        elif state.tab == "features":
            page.pieces += [b.strip() for b in product.bullet_points]
        return page

    # item page: option groups, then title / price / rating, tabs, buy
    radios: list[Clickable] = []
    for name, values in product.options.items():
        page.pieces.append(name)
        for value in values:
            page.pieces.append(value)
            radios.append(Clickable("option", value, name))
    page.pieces += [product.title, f"Price: {product.price_text}", f"Rating: {product.rating}"]
    _buttons(page, *TABS, BUY_NOW)
    for radio in radios:
        page.clickables[radio.value] = radio
    page.pieces = [p.strip() for p in page.pieces if p]  # an empty element has no text node
    return page
