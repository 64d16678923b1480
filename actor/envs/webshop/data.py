"""The offline WebShop 1k pack: products and synthetic instructions, parsed once per process.

The pack (``shared/data/webshop``, described in its ``SOURCE.md``) holds the 1,000 products of
WebShop-small already processed by the original ``engine.load_products`` (``Title``,
``BulletPoints``, ``pricing`` as floats, lower-cased ``options``), plus ``items_ins_v2_1000`` with
each product's attributes and its synthetic instruction. Nothing here is copied into the repo.
"""
from __future__ import annotations

import json
import logging
import lzma
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from himac.protocol.config import SHARED_DIR_DEFAULT

log = logging.getLogger(__name__)

DATA_ENV_VAR = "HIMAC_WEBSHOP_DATA"
PRODUCTS_FILE = "items_shuffle_1000.processed.json.xz"
INSTRUCTIONS_FILE = "items_ins_v2_1000.json.xz"


@dataclass(frozen=True)
class Product:
    asin: str  # upper-case Amazon id, e.g. "B078GWRC1J"
    title: str
    description: str
    bullet_points: tuple[str, ...]
    price_text: str  # "$10.99" or "$2.99 to $6.99", as the pages show it
    pricing: tuple[float, ...]  # [price] or [low, high]
    rating: str
    category: str  # beauty / electronics / fashion / garden / grocery
    query: str  # the scrape query, lower-case (r_type's query match)
    product_category: str  # "A › B › C" breadcrumb (r_type's category match)
    options: dict[str, list[str]]  # lower-case option name -> lower-case values, in page order
    attributes: tuple[str, ...]  # annotated attributes (attribute reward)
    instruction: str | None  # synthetic instruction, None when the product has no goal
    instruction_attributes: tuple[str, ...]


def resolve_data_dir(configured: str = "") -> Path:
    """Env var > config field > ``<repo>/../shared/data/webshop``."""
    chosen = os.environ.get(DATA_ENV_VAR) or configured or str(Path(SHARED_DIR_DEFAULT) / "data" / "webshop")
    return Path(chosen).expanduser().resolve()


def _read_xz_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(
            f"WebShop data file missing: {path} (set webshop.data_dir or ${DATA_ENV_VAR} to the folder "
            f"holding {PRODUCTS_FILE} and {INSTRUCTIONS_FILE})"
        )
    with lzma.open(path) as f:
        return json.loads(f.read())


def load_products(data_dir: Path) -> list[Product]:
    """All 1,000 products in file order (the order of the original goals and of the search index)."""
    raw_products = _read_xz_json(data_dir / PRODUCTS_FILE)
    instructions = _read_xz_json(data_dir / INSTRUCTIONS_FILE)
    products = []
    for raw in raw_products:
        asin = raw["asin"]
        ins = instructions.get(asin, {})
        products.append(
            Product(
                asin=asin,
                title=raw["Title"],
                description=raw["Description"] or "",
                bullet_points=tuple(raw["BulletPoints"]),
                price_text=raw["Price"],
                pricing=tuple(float(p) for p in raw["pricing"]) or (100.0,),
                rating=str(raw.get("Rating", "N.A.")),
                category=raw["category"],
                query=raw["query"].lower().strip(),
                product_category=raw["product_category"],
                options={name: list(values) for name, values in (raw.get("options") or {}).items()},
                # as load_products: the annotated list (even empty), a dummy when the asin has none
                attributes=tuple(ins["attributes"] if "attributes" in ins else ["DUMMY_ATTR"]),
                instruction=ins.get("instruction"),
                instruction_attributes=tuple(ins.get("instruction_attributes") or ()),
            )
        )
    log.info("webshop: loaded %d products from %s", len(products), data_dir)
    return products
