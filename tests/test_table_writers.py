"""risda.runner.table_writers: pandas writes the Markdown and LaTeX tables; cells stay the text they were."""
from __future__ import annotations

import pandas as pd

from risda.runner.table_writers import latex, markdown

TABLE = pd.DataFrame([["RISDA_x & y", "49.14 ± 1.27", "22.60"], ["CE", "—", ""]], columns=["arm", "λ=100", "α, β (%)"])


def test_markdown_keeps_the_text_of_every_cell_and_aligns_as_asked():
    lines = markdown(TABLE, "lrr").splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert cells[0] == ["arm", "λ=100", "α, β (%)"] and cells[2] == ["RISDA_x & y", "49.14 ± 1.27", "22.60"]  # not 22.6
    assert cells[3] == ["CE", "—", ""]
    assert cells[1][0].startswith(":") and not cells[1][0].endswith(":") and cells[1][1].endswith(":")


def test_latex_escapes_cells_header_and_caption_and_writes_booktabs():
    tex = latex(TABLE, "errors_at 100% — test").splitlines()
    assert tex[:5] == ["\\begin{table}[t]", "\\centering", "\\caption{errors\\_at 100\\% -- test}", "\\begin{tabular}{lrr}",
                       "\\toprule"]
    assert tex[5] == "arm & $\\lambda$=100 & $\\alpha$, $\\beta$ (\\%) \\\\" and tex[6] == "\\midrule"
    assert tex[7] == "RISDA\\_x \\& y & 49.14 $\\pm$ 1.27 & 22.60 \\\\" and tex[8] == "CE & -- &  \\\\"
    assert tex[-3:] == ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
