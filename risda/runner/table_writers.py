"""Tables as text, written by pandas: Markdown (`DataFrame.to_markdown`, tabulate's pipe format)
and LaTeX (`Styler.to_latex`, booktabs rules). Every cell is already text: nothing is re-parsed
as a number (22.60 stays 22.60)."""
from __future__ import annotations

import re

import pandas as pd

SYMBOLS = {"±": "$\\pm$", "λ": "$\\lambda$", "α": "$\\alpha$", "β": "$\\beta$", "—": "--"}


def markdown(df: pd.DataFrame, align: str | None = None) -> str:
    """A pipe table; `align`: one 'l' or 'r' per column (default: all left)."""
    align = align or "l" * df.shape[1]
    names = {"l": "left", "r": "right"}
    return df.to_markdown(index=False, disable_numparse=True, colalign=[names[a] for a in align])


def markdown_lines(df: pd.DataFrame, align: str | None = None) -> list[str]:
    return markdown(df, align).splitlines()


def symbols(text: str) -> str:
    """±, λ, α, β and the em dash as LaTeX (after pandas has escaped the text)."""
    for a, b in SYMBOLS.items():
        text = text.replace(a, b)
    return text


def escape(text: str) -> str:
    """LaTeX escaping of text that is not a cell (a caption), as pandas escapes cells."""
    return symbols(re.sub(r"([&%$#_{}])", r"\\\1", text.replace("\\", "\\textbackslash ")))


def latex(df: pd.DataFrame, caption: str, align: str | None = None) -> str:
    """A booktabs table in a `table` float: first column left, the rest right, unless `align`."""
    styler = (df.style.hide(axis="index").format(symbols, escape="latex")
              .format_index(symbols, escape="latex", axis=1))
    return styler.to_latex(hrules=True, caption=escape(caption), position="t", position_float="centering",
                           column_format=align or "l" + "r" * (df.shape[1] - 1)).rstrip("\n")
