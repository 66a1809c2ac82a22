"""productpage's HTML: the product page and the index, as plain strings (no template engine).

Stars are ``<font color="black">`` (reviews v2) or ``<font color="red">`` (v3) holding ★ for each star and ☆
for each missing one, so a page's version shows to the eye and to ``grep``.
"""

from __future__ import annotations

from collections.abc import Mapping
from html import escape
from typing import Any

STYLESHEET_PATH = "/static/bookinfo.css"
"""Where productpage serves ``STYLE``; every page links it relative to itself, as Istio's productpage links its
static files (the gateway routes ``/static`` to productpage)."""
STYLE = """
body { font-family: sans-serif; margin: 0; color: #222; }
nav { background: #222; color: #eee; padding: 10px 20px; display: flex; justify-content: space-between; }
nav a, nav button { color: #eee; }
main { padding: 10px 20px; }
.columns { display: flex; gap: 40px; }
.columns > div { flex: 1; }
h3, h4 { color: #337ab7; text-align: center; }
blockquote { border-left: 4px solid #ddd; margin: 10px 0; padding: 4px 12px; }
font { font-size: 1.3em; }
"""


def _shell(title: str, nav: str, content: str) -> str:
    return (f'<!DOCTYPE html>\n<html>\n<head>\n<meta charset="utf-8">\n<title>{escape(title)}</title>\n'
            f'<link rel="stylesheet" href="{STYLESHEET_PATH.lstrip("/")}">\n</head>\n'
            f"<body>\n<nav>{nav}</nav>\n<main>\n{content}\n</main>\n"
            "</body>\n</html>\n")


def _nav(user: str) -> str:
    brand = '<a href="productpage">BookInfo Sample</a>'
    if user:
        account = f'<span>{escape(user)} ( <a href="logout">sign out</a> )</span>'
    else:
        account = ('<form method="post" action="login" name="login_form">'
                   '<input type="text" name="username" placeholder="User Name"> '
                   '<input type="password" name="passwd" placeholder="Password"> '
                   '<button type="submit">Sign in</button></form>')
    return brand + account


def _details(status: int, details: Mapping[str, Any]) -> str:
    if status != 200:
        return ("<h4>Error fetching product details!</h4>\n"
                f"<p>{escape(str(details.get('error', '')))}</p>")
    rows = "".join(f"<dt>{label}:</dt><dd>{escape(str(details.get(key, '')))}</dd>\n"
                   for label, key in (("Type", "type"), ("Pages", "pages"), ("Publisher", "publisher"),
                                      ("Language", "language"), ("ISBN-10", "ISBN-10"),
                                      ("ISBN-13", "ISBN-13")))
    return f"<h4>Book Details</h4>\n<dl>\n{rows}</dl>"


def stars(count: int, color: str) -> str:
    """``count`` of five stars in ``color``."""
    count = max(0, min(5, count))
    return f'<font color="{escape(color)}">{"★" * count}{"☆" * (5 - count)}</font>'


def _review(review: Mapping[str, Any]) -> str:
    parts = [f"<p>{escape(str(review.get('text', '')))}</p>",
             f"<small>{escape(str(review.get('reviewer', '')))}</small>"]
    rating = review.get("rating")
    if isinstance(rating, Mapping):
        if isinstance(rating.get("stars"), int):
            parts.append(stars(rating["stars"], str(rating.get("color", "black"))))
        elif rating.get("error"):
            parts.append(f"<p><i>{escape(str(rating['error']))}</i></p>")
    return "<blockquote>\n" + "\n".join(parts) + "\n</blockquote>"


def _reviews(status: int, reviews: Mapping[str, Any]) -> str:
    if status != 200:
        return ("<h4>Error fetching product reviews!</h4>\n"
                f"<p>{escape(str(reviews.get('error', '')))}</p>")
    items = reviews.get("reviews")
    body = "\n".join(_review(r) for r in items if isinstance(r, Mapping)) if isinstance(items, list) else ""
    return f"<h4>Book Reviews</h4>\n{body}"


def product_page(product: Mapping[str, Any], user: str, details_status: int, details: Mapping[str, Any],
                 reviews_status: int, reviews: Mapping[str, Any]) -> str:
    """The whole page."""
    # descriptionHtml is productpage's own markup, shown unescaped as Istio's template does.
    content = (f"<h3>{escape(str(product['title']))}</h3>\n<p>Summary: {product['descriptionHtml']}</p>\n"
               f'<div class="columns">\n<div>\n{_details(details_status, details)}\n</div>\n'
               f"<div>\n{_reviews(reviews_status, reviews)}\n</div>\n</div>")
    return _shell("Simple Bookstore App", _nav(user), content)


def index() -> str:
    """The landing page: what Bookinfo is made of, and links to the product page."""
    content = ("<h3>Hello! This is a simple bookstore application consisting of four services</h3>\n"
               "<p>productpage calls details and reviews; reviews v2 and v3 call ratings.</p>\n"
               "<ul><li>details (v1)</li><li>reviews (v1: no stars, v2: black stars, v3: red stars)</li>"
               "<li>ratings (v1)</li></ul>\n"
               '<p><a href="productpage?u=normal">Normal user</a> | '
               '<a href="productpage?u=test">Test user</a></p>')
    return _shell("Simple Bookstore App", '<a href="productpage">BookInfo Sample</a>', content)


def not_found() -> str:
    """404."""
    return _shell("Not Found", '<a href="productpage">BookInfo Sample</a>', "<h3>Not Found</h3>")
