"""Everything an episode reads, built once per process: products, prices, shuffled goals, search index."""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from .data import Product, load_products
from .goals import Goal, build_synthetic_goals, draw_purchase_prices, shuffled
from .search import SearchEngine, product_document

log = logging.getLogger(__name__)

SEARCH_CACHE_SIZE = 4096  # distinct queries remembered per process


@dataclass
class Catalog:
    products: list[Product]
    by_asin: dict[str, Product]
    prices: dict[str, float]  # purchase price per asin (range-priced products: one seeded draw)
    goals: list[Goal]  # in the text env's shuffled order; task ids index this list
    engine: SearchEngine
    _search_cache: dict[str, list[str]] = field(default_factory=dict, repr=False)

    def search(self, query: str) -> list[str]:
        """ASINs of the top hits for a query, best first (at most 50)."""
        hits = self._search_cache.get(query)
        if hits is None:
            hits = [self.products[i].asin for i in self.engine.search(query)]
            if len(self._search_cache) >= SEARCH_CACHE_SIZE:
                self._search_cache.pop(next(iter(self._search_cache)))  # oldest first
            self._search_cache[query] = hits
        return hits


@lru_cache(maxsize=4)
def load_catalog(data_dir: Path, price_seed: int) -> Catalog:
    """Parse the pack and index it; cached, so every env of a process shares one catalog."""
    start = time.perf_counter()
    products = load_products(data_dir)
    rng = random.Random(price_seed)
    prices = draw_purchase_prices(products, rng)  # same draw order as the original:
    goals = shuffled(build_synthetic_goals(products, prices, rng))  # prices first, then bounds
    engine = SearchEngine([product_document(p) for p in products])
    log.info(
        "webshop: catalog ready in %.2fs (%d products, %d goals, %d index terms)",
        time.perf_counter() - start, len(products), len(goals), engine.n_terms,
    )
    return Catalog(products, {p.asin: p for p in products}, prices, goals, engine)
