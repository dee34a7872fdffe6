"""The bench report, written from the cells' run directories into ``<bench>/report/``.

- ``results.csv``: one row per cell (method x setting x seed): last-round and
  validation-selected figures, unseen clients, rounds to the target, bytes, wall time;
- ``report.md`` and ``report.html`` (the same document; the HTML embeds its figures);
- ``curves-<setting>.png``, ``clients-<setting>.png`` and, when the settings span partitions
  from IID to pathological, ``heterogeneity.png``.

Every table shows mean ± std over seeds (population std). Accuracy is pooled over clients'
test splits (sum correct / sum samples) unless a column says otherwise. Model selection uses
validation splits only; the "best round on test" figure appears only beside published numbers
that were measured that way, and is labelled as leaking.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import platform
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedtl.bench.spec import BenchSpec, Cell, _safe
from fedtl.data import dataset_spec
from fedtl.registry import STRATEGIES
from fedtl.results import RunDirectory, atomic_write
from fedtl.server_app import FINAL_KEYS


@dataclass
class CellResult:
    """One cell's run directory, read back."""

    cell: Cell
    path: Path
    status: str                 # completed, failed, interrupted, or missing (never ran)
    summary: dict | None
    rounds: list[dict]          # evaluated rounds only
    clients: list[dict]         # clients.csv: the last evaluated round
    has_global: bool

    @property
    def completed(self) -> bool:
        return self.status == "completed"


def collect(spec: BenchSpec, out: Path) -> list[CellResult]:
    """Every cell of ``spec`` as found under ``out``."""
    results = []
    for cell in spec.cells:
        path = Path(out) / cell.relative_dir
        run = RunDirectory(path)
        summary = None
        if (path / "summary.json").is_file():
            summary = run.summary()
        status = summary["status"] if summary else "missing"
        has_global = STRATEGIES.get(cell.config.strategy).has_global_model
        results.append(CellResult(cell, path, status, summary,
                                  [r for r in run.rounds() if r.get("evaluated")],
                                  run.table("clients.csv"), has_global))
    return results


def first_round_reaching(rounds: list[dict], key: str, target: float | None) -> int | None:
    """The first evaluated round whose ``key`` is at least ``target`` (None if never)."""
    if target is None:
        return None
    for r in rounds:
        if r.get(key) is not None and r[key] >= target:
            return int(r["round"])
    return None


def best_on_test(rounds: list[dict], key: str) -> float | None:
    """The best test accuracy over evaluated rounds: early stopping ON TEST, leaking; shown
    only beside published numbers measured that way."""
    values = [r[key] for r in rounds if r.get(key) is not None]
    return max(values) if values else None


def csv_row(result: CellResult, target: float | None) -> dict[str, Any]:
    """The results.csv row of one cell."""
    cell, cfg, s = result.cell, result.cell.config, result.summary or {}
    rounds_done = s.get("rounds_completed") or 0
    row: dict[str, Any] = {
        "method": cell.method, "setting": cell.setting_label, "seed": cell.seed,
        "status": result.status, "strategy": cfg.strategy, "trainer": cfg.trainer,
        "dataset": cfg.dataset, "model": cfg.model, "partitioner": cfg.partitioner,
        "alpha": cfg.alpha, "labels_per_client": cfg.labels_per_client,
        "num_clients": cfg.num_clients, "unseen_clients": cfg.unseen_clients,
        "num_rounds": cfg.num_rounds, "rounds_completed": rounds_done,
        "has_global_model": result.has_global,
    }
    final, best = s.get("final") or {}, s.get("best") or {}
    for key in FINAL_KEYS:
        row[f"last_{key}"] = final.get(key)
    row["best_global_round"] = best.get("global_round")
    row["best_personalized_round"] = best.get("personalized_round")
    for key in FINAL_KEYS:
        row[f"best_{key}"] = best.get(key)
    row["personalized_target_round"] = first_round_reaching(result.rounds,
                                                            "personalized_accuracy", target)
    row["global_target_round"] = first_round_reaching(result.rounds, "global_accuracy", target)
    row["personalized_best_on_test"] = best_on_test(result.rounds, "personalized_accuracy")
    row["global_best_on_test"] = best_on_test(result.rounds, "global_accuracy")
    row["bytes_sent_per_round"] = s["bytes_sent"] / rounds_done if rounds_done else None
    row["bytes_received_per_round"] = (s["bytes_received"] / rounds_done if rounds_done
                                       else None)
    row["wall_seconds"] = s.get("wall_seconds")
    row["run_dir"] = str(cell.relative_dir)
    return row


# --- numbers over seeds --------------------------------------------------------------------

def over_seeds(values: Sequence[float | None]) -> tuple[float, float, int] | None:
    """Mean, population std and count of the values that exist (None if none do)."""
    present = np.asarray([v for v in values if v is not None and not
                          (isinstance(v, float) and math.isnan(v))], dtype=float)
    if present.size == 0:
        return None
    return float(present.mean()), float(present.std()), int(present.size)


def fmt_acc(stats: tuple[float, float, int] | None, seeds: int) -> str:
    """An accuracy in percent: ``95.31 ± 0.42``; ``(2 of 3 seeds)`` when some are missing."""
    if stats is None:
        return "n/a"
    mean, std, n = stats
    text = f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if seeds > 1 and n > 1 else "")
    return text + (f" ({n} of {seeds} seeds)" if n < seeds else "")


def fmt_rounds(values: Sequence[int | None], seeds: int) -> str:
    reached = [v for v in values if v is not None]
    if not reached:
        return "not reached"
    text = f"{np.mean(reached):.0f}" + (f" ± {np.std(reached):.0f}" if len(reached) > 1 else "")
    return text + (f" ({len(reached)} of {seeds} seeds)" if len(reached) < seeds else "")


def fmt_bytes(stats: tuple[float, float, int] | None) -> str:
    if stats is None:
        return "n/a"
    value = stats[0]
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{value:.0f} B"
        value /= 1000
    return f"{value:.1f} GB"


def fmt_seconds(stats: tuple[float, float, int] | None, seeds: int) -> str:
    if stats is None:
        return "n/a"
    mean, std, n = stats
    return f"{mean:.0f}" + (f" ± {std:.0f}" if n > 1 else "") + " s"


# --- one document, two renderings ---------------------------------------------------------

class Document:
    """Headings, paragraphs, tables, figures and code, rendered as Markdown or HTML."""

    def __init__(self) -> None:
        self.blocks: list[tuple] = []

    def heading(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def para(self, text: str) -> None:
        self.blocks.append(("p", text))

    def bullets(self, items: Sequence[str]) -> None:
        self.blocks.append(("ul", list(items)))

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        self.blocks.append(("table", list(header), [list(r) for r in rows]))

    def image(self, path: Path, caption: str) -> None:
        self.blocks.append(("img", Path(path), caption))

    def code(self, text: str) -> None:
        self.blocks.append(("code", text))

    def markdown(self) -> str:
        out = []
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                out.append("#" * block[1] + " " + block[2])
            elif kind == "p":
                out.append(block[1])
            elif kind == "ul":
                out.append("\n".join(f"- {item}" for item in block[1]))
            elif kind == "table":
                header, rows = block[1], block[2]
                lines = ["| " + " | ".join(header) + " |",
                         "|" + "|".join("---" for _ in header) + "|"]
                lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |"
                          for r in rows]
                out.append("\n".join(lines))
            elif kind == "img":
                out.append(f"![{block[2]}]({block[1].name})\n\n*{block[2]}*")
            elif kind == "code":
                out.append(f"```\n{block[1]}\n```")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        """A self-contained page: the figures are embedded as base64 PNGs."""
        esc = html.escape
        body = []
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                body.append(f"<h{block[1]}>{esc(block[2])}</h{block[1]}>")
            elif kind == "p":
                body.append(f"<p>{_inline(block[1])}</p>")
            elif kind == "ul":
                body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in block[1])
                            + "</ul>")
            elif kind == "table":
                head = "".join(f"<th>{_inline(h)}</th>" for h in block[1])
                rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>"
                               for r in block[2])
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody>"
                            "</table>")
            elif kind == "img":
                data = base64.b64encode(block[1].read_bytes()).decode()
                body.append(f'<figure><img alt="{esc(block[2])}" '
                            f'src="data:image/png;base64,{data}"><figcaption>{esc(block[2])}'
                            "</figcaption></figure>")
            elif kind == "code":
                body.append(f"<pre>{esc(block[1])}</pre>")
        style = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;"
                 "padding:0 1em;color:#222}table{border-collapse:collapse;margin:1em 0;"
                 "font-size:0.88em}th,td{border:1px solid #ccc;padding:3px 7px;text-align:left}"
                 "th{background:#f3f3f3}figure{margin:1.5em 0}img{max-width:100%}"
                 "figcaption{font-size:0.85em;color:#555}pre,code{background:#f6f6f6}"
                 "pre{padding:0.8em;overflow-x:auto}")
        return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{esc(title)}</title><style>{style}</style></head><body>\n"
                + "\n".join(body) + "\n</body></html>\n")


def _inline(text: str) -> str:
    """Markdown's inline ``code`` and **bold** as HTML, the rest escaped."""
    out, code = [], False
    for i, part in enumerate(html.escape(text).split("`")):
        if code:
            out.append(f"<code>{part}</code>")
        else:
            pieces = part.split("**")
            out.append("".join(f"<b>{p}</b>" if j % 2 else p for j, p in enumerate(pieces)))
        code = not code
    return "".join(out)


# --- the report -----------------------------------------------------------------------------

def _heterogeneity_rank(cfg) -> tuple[int, float, str] | None:
    """Where a setting sits between IID and pathological, and its axis label (None: off)."""
    if cfg.partitioner == "iid":
        return (0, 0.0, "IID")
    if cfg.partitioner == "dirichlet":
        return (1, -cfg.alpha, f"Dir(α={cfg.alpha:g})")
    if cfg.partitioner == "shard":
        return (2, -cfg.shards_per_client, f"{cfg.shards_per_client} shards")
    if cfg.partitioner == "pathological":
        return (3, -cfg.labels_per_client, f"{cfg.labels_per_client} labels/client")
    return None


class Report:
    """Builds the report of one bench from its cells."""

    def __init__(self, spec: BenchSpec, out: Path):
        self.spec, self.out = spec, Path(out)
        self.dir = self.out / "report"
        self.results = collect(spec, out)
        self.seeds = len(spec.seeds)
        self.methods = list(spec.methods)
        self.labels = list(dict.fromkeys(r.cell.setting_label for r in self.results))
        self.unseen = any(r.cell.config.unseen_clients > 0 for r in self.results)

    def group(self, label: str, method: str) -> list[CellResult]:
        return [r for r in self.results if r.cell.setting_label == label
                and r.cell.method == method]

    def stat(self, cells: list[CellResult], pick: Callable[[CellResult], float | None]):
        return over_seeds([pick(r) for r in cells if r.completed])

    def acc(self, cells: list[CellResult], part: str, key: str, needs_global: bool = False
            ) -> str:
        done = [r for r in cells if r.completed]
        if not done:
            return "not run" if not any(r.status != "missing" for r in cells) else "failed"
        if needs_global and not done[0].has_global:
            return "n/a (no global model)"
        if key == "centralized_accuracy" and not dataset_spec(
                done[0].cell.config).has_central_test:  # a DA run's is the target's
            return "n/a (no central test set)"
        return fmt_acc(self.stat(done, lambda r: (r.summary[part] or {}).get(key)), self.seeds)

    def personal_model(self, method: str) -> str:
        return STRATEGIES.get(self.spec.methods[method].get(
            "strategy", self.spec.base.get("strategy", "fedavg"))).personal_model

    # tables --------------------------------------------------------------------------------

    def headline(self) -> tuple[list[str], list[list[str]]]:
        header = ["setting", "method", "personalized model", "personalized acc. (%)",
                  "global acc. (%)"]
        if self.unseen:
            header.append("unseen clients: personalized (%)")
        header += ["clients hurt by personalization (%)",
                   "personalized, validation-selected (%)"]
        rows = []
        for label in self.labels:
            for method in self.methods:
                cells = self.group(label, method)
                row = [label, method, self.personal_model(method),
                       self.acc(cells, "final", "personalized_accuracy"),
                       self.acc(cells, "final", "global_accuracy", needs_global=True)]
                if self.unseen:
                    row.append(self.acc(cells, "final", "unseen_personalized_accuracy"))
                row += [self.acc(cells, "final", "personalization_hurts_share", needs_global=True),
                        self.acc(cells, "best", "personalized_accuracy")]
                rows.append(row)
        return header, rows

    def accuracy_table(self, label: str) -> tuple[list[str], list[list[str]]]:
        header = ["method", "personalized (pooled)", "personalized per client: mean",
                  "per client: std", "bottom-10% client", "global (pooled)",
                  "global (central test set)", "clients hurt (%)"]
        if self.unseen:
            header += ["unseen: personalized", "unseen: global"]
        rows = []
        for method in self.methods:
            c = self.group(label, method)
            row = [method, self.acc(c, "final", "personalized_accuracy"),
                   self.acc(c, "final", "personalized_accuracy_mean"),
                   self.acc(c, "final", "personalized_accuracy_std"),
                   self.acc(c, "final", "personalized_accuracy_bottom10"),
                   self.acc(c, "final", "global_accuracy", needs_global=True),
                   self.acc(c, "final", "centralized_accuracy", needs_global=True),
                   self.acc(c, "final", "personalization_hurts_share", needs_global=True)]
            if self.unseen:
                row += [self.acc(c, "final", "unseen_personalized_accuracy"),
                        self.acc(c, "final", "unseen_global_accuracy", needs_global=True)]
            rows.append(row)
        return header, rows

    def selected_table(self, label: str) -> tuple[list[str], list[list[str]]]:
        header = ["method", "personalized (pooled)", "its round", "global (pooled)",
                  "its round", "global (central test set)"]
        if self.unseen:
            header.append("unseen: personalized")
        rows = []
        for method in self.methods:
            c = self.group(label, method)
            done = [r for r in c if r.completed]
            g_round = fmt_rounds([r.summary["best"].get("global_round") for r in done],
                                 self.seeds) if done and done[0].has_global else "n/a"
            p_round = fmt_rounds([r.summary["best"].get("personalized_round") for r in done],
                                 self.seeds) if done else "n/a"
            row = [method, self.acc(c, "best", "personalized_accuracy"), p_round,
                   self.acc(c, "best", "global_accuracy", needs_global=True), g_round,
                   self.acc(c, "best", "centralized_accuracy", needs_global=True)]
            if self.unseen:
                row.append(self.acc(c, "best", "unseen_personalized_accuracy"))
            rows.append(row)
        return header, rows

    def cost_table(self, label: str) -> tuple[list[str], list[list[str]]]:
        target = self.spec.target_accuracy
        header = ["method"]
        if target is not None:
            header += [f"round reaching {100 * target:g}%: personalized", "global"]
        header += ["sent per round", "received per round", "wall time per run"]
        rows = []
        for method in self.methods:
            c = [r for r in self.group(label, method) if r.completed]
            row = [method]
            if target is not None:
                row.append(fmt_rounds([first_round_reaching(r.rounds, "personalized_accuracy",
                                                            target) for r in c], self.seeds))
                row.append(fmt_rounds([first_round_reaching(r.rounds, "global_accuracy",
                                                            target) for r in c], self.seeds)
                           if c and c[0].has_global else "n/a (no global model)")
            per_round = [(r.summary["bytes_sent"] / r.summary["rounds_completed"],
                          r.summary["bytes_received"] / r.summary["rounds_completed"])
                         for r in c if r.summary.get("rounds_completed")]
            if c and not c[0].has_global:
                row += ["none needed (n/a)", "none needed (n/a)"]
            else:
                row += [fmt_bytes(over_seeds([s for s, _ in per_round])),
                        fmt_bytes(over_seeds([r for _, r in per_round]))]
            row.append(fmt_seconds(over_seeds([r.summary.get("wall_seconds") for r in c]),
                                   self.seeds))
            rows.append(row)
        return header, rows

    def reference_table(self) -> tuple[list[str], list[list[str]]] | None:
        if not self.spec.references:
            return None
        header = ["method", "setting", "fedtl personalized: last round",
                  "validation-selected", "best round on test (leaks)", "published personalized",
                  "fedtl global: last round", "validation-selected",
                  "best round on test (leaks)", "published global", "source"]
        rows = []
        for method, ref in self.spec.references.items():
            for label in self.labels:
                if "setting" in ref and self.group(label, method) and \
                        self.group(label, method)[0].cell.setting != ref["setting"]:
                    continue
                c = self.group(label, method)
                done = [r for r in c if r.completed]

                def on_test(key: str) -> str:
                    return fmt_acc(over_seeds([best_on_test(r.rounds, key) for r in done]),
                                   self.seeds) if done else "not run"

                published = {k: (f"{100 * ref[k]:.2f}" if k in ref else "—")
                             for k in ("personalized", "global")}
                rows.append([method, label, self.acc(c, "final", "personalized_accuracy"),
                             self.acc(c, "best", "personalized_accuracy"),
                             on_test("personalized_accuracy"), published["personalized"],
                             self.acc(c, "final", "global_accuracy", needs_global=True),
                             self.acc(c, "best", "global_accuracy", needs_global=True),
                             on_test("global_accuracy"), published["global"],
                             ref.get("source", "")])
        return header, rows

    # figures -------------------------------------------------------------------------------

    def figures_for(self, label: str) -> list[tuple[Path, str]]:
        from fedtl.bench.figures import accuracy_curves, client_scatter

        made: list[tuple[Path, str]] = []
        if not any(r.completed for r in self.results if r.cell.setting_label == label):
            return made
        curves: dict[str, dict[str, list]] = {}
        points: dict[str, list] = {}
        for method in self.methods:
            done = [r for r in self.group(label, method) if r.completed]
            curves[method] = {kind: [[(r["round"], r.get(f"{kind}_accuracy")) for r in c.rounds]
                                     for c in done]
                              for kind in ("global", "personalized", "unseen_personalized")}
            points[method] = [
                (float(row["test_global_accuracy"]), float(row["test_personalized_accuracy"]),
                 row.get("unseen") == "1")
                for c in done if c.has_global for row in c.clients
                if row.get("test_global_accuracy") not in (None, "")
                and row.get("test_personalized_accuracy") not in (None, "")]
        name = _safe(label)
        path = accuracy_curves(f"{self.spec.title}: {label} (mean ± std over seeds)", curves,
                               self.dir / f"curves-{name}.png")
        made.append((path, f"{label}: pooled test accuracy per round, personalized (solid) and "
                           "global (dashed), mean ± std over seeds"))
        path = client_scatter(f"{label}: each client's test accuracy, last round, all seeds",
                              points, self.dir / f"clients-{name}.png")
        if path is not None:
            made.append((path, f"{label}: per-client test accuracy, global model (x) against "
                               "personalized model (y); above the diagonal personalization "
                               "helps (local-only has no global model and is left out)"))
        return made

    def heterogeneity_figure(self) -> tuple[Path, str] | None:
        from fedtl.bench.figures import heterogeneity_sweep

        by_setting = {}
        for label in self.labels:
            cells = [r for r in self.results if r.cell.setting_label == label]
            rank = _heterogeneity_rank(cells[0].cell.config)
            if rank is not None:
                by_setting[label] = rank
        if len(by_setting) < 2 or len({r[2] for r in by_setting.values()}) < 2:
            return None
        order = sorted(by_setting, key=lambda k: by_setting[k][:2])
        series = {}
        for method in self.methods:
            series[method] = {}
            for kind in ("personalized", "global"):
                values = []
                for label in order:
                    s = self.stat(self.group(label, method),
                                  lambda r: (r.summary["final"] or {}).get(f"{kind}_accuracy"))
                    values.append(None if s is None else (s[0], s[1]))
                series[method][kind] = values
        labels = [f"{by_setting[k][2]}" + (f"\n{k}" if "+" in k else "") for k in order]
        path = heterogeneity_sweep(f"{self.spec.title}: accuracy by partition", labels,
                                   series, self.dir / "heterogeneity.png")
        return path, ("pooled test accuracy at the last round as the partition goes from IID to "
                      "pathological: personalized (solid) and global (dashed), mean ± std "
                      "over seeds")

    # the document ---------------------------------------------------------------------------

    def document(self, command: str | None) -> Document:
        doc = Document()
        spec = self.spec
        done = [r for r in self.results if r.completed]
        failed = [r for r in self.results if r.status not in ("completed", "missing")]
        missing = [r for r in self.results if r.status == "missing"]
        doc.heading(1, spec.title)
        summary = (f"{len(self.results)} runs: {len(self.methods)} methods × "
                   f"{len(self.labels)} settings × {self.seeds} seed{'s' * (self.seeds != 1)} "
                   f"({', '.join(map(str, spec.seeds))}); {len(done)} completed")
        if failed:
            summary += f", {len(failed)} failed"
        if missing:
            summary += f", {len(missing)} not run"
        total = sum(r.summary.get("wall_seconds") or 0 for r in done)
        doc.para(summary + f"; the completed runs took {total / 60:.1f} min of wall time in all.")
        if command:
            doc.code(command)
        cfg0 = self.results[0].cell.config
        doc.para(f"Each run: {cfg0.num_clients} clients, {cfg0.num_rounds} rounds, "
                 f"evaluated every {cfg0.eval_every} rounds and at the last; spec "
                 f"`{spec.path.name}` (copied to `bench.toml` beside the cells); every cell is a "
                 "fedtl run directory under `cells/` (its `config.toml` reruns it with "
                 "`fedtl run`).")
        doc.heading(2, "How the numbers are measured")
        items = [
            "Every method of a setting and seed runs on the **same per-client train / "
            "validation / test splits** (the bench refuses specs where methods change them).",
            "**Personalized accuracy**: each client's personalized model on its own test split "
            "(FedAvg: FedAvg-FT, the global model fine-tuned on the client's train split; "
            "pFedMe: θ_i; Ditto: v_i; local-only: the client's own model). **Global "
            "accuracy**: the global model on the same splits. Both pooled: Σ correct / Σ test "
            "samples over the participating clients. The central test set is the dataset's "
            "own test set (n/a where it has none).",
            "Per client: the unweighted mean and std of client accuracies, and the 10th "
            "percentile (bottom-10% client). **Clients hurt**: the share whose personalized "
            "model scores below the global model on their test split.",
            "**Model selection on validation only.** Tables show the last round and the round "
            "chosen on the clients' validation splits (best pooled validation accuracy, "
            "separately for the global and the personalized model). Test data never picks a "
            "round; the only exception is the column labelled \"best round on test (leaks)\" "
            "beside published numbers that were measured that way.",
            "Each figure is mean ± std over seeds (population std); a cell that did not "
            "complete is left out and the count of seeds is shown.",
            "Local-only trains no shared model: its global figures are **n/a**, not the score "
            "of untrained weights, and it needs no communication (fedtl's loop still ships the "
            "unchanged initial weights, counted in results.csv only).",
        ]
        if self.unseen:
            items.append(
                f"**Unseen clients**: a share `unseen-clients` = {cfg0.unseen_clients:g} of the "
                "clients (drawn from the seed) never trains; at each evaluation each is "
                "personalized from the current global model on its own train split by the "
                "method's own rule (FedAvg-FT: `finetune-steps` SGD steps; pFedMe: θ = "
                "prox(w); Ditto: `local-steps` regularised steps; local-only: `finetune-steps` "
                "from the initial weights) and tested. Participating-client figures exclude "
                "them.")
        if spec.target_accuracy is not None:
            items.append(f"**Rounds to target**: the first evaluated round whose pooled test "
                         f"accuracy reaches {100 * spec.target_accuracy:g}% (resolution: "
                         f"`eval-every`).")
        items.append("**Bytes** per round: model weights sent to clients (training and "
                     "evaluation messages) and received from them, averaged over rounds. "
                     "**Wall time** per run: the federation's own time, Ray's start-up shared "
                     "by the bench excluded; " + _machine() + ".")
        doc.bullets(items)
        doc.heading(2, "Headline")
        doc.table(*self.headline())
        doc.para("Last round unless marked; mean ± std over seeds, in percent.")
        heterogeneity = self.heterogeneity_figure()
        if heterogeneity:
            doc.image(*heterogeneity)
        refs = self.reference_table()
        if refs:
            doc.heading(2, "Beside the published numbers")
            doc.table(*refs)
        for label in self.labels:
            doc.heading(2, f"Setting: {label}")
            cfg = next(r.cell.config for r in self.results if r.cell.setting_label == label)
            doc.para(f"{cfg.dataset}, {cfg.partitioner}"
                     + (f" α = {cfg.alpha:g}" if cfg.partitioner in ("dirichlet",
                                                                     "quantity-skew") else "")
                     + (f" {cfg.labels_per_client} labels per client"
                        if cfg.partitioner == "pathological" else "")
                     + f", model {cfg.model}, trainer {cfg.trainer}.")
            doc.heading(3, "Last round")
            doc.table(*self.accuracy_table(label))
            doc.heading(3, "Validation-selected round")
            doc.table(*self.selected_table(label))
            doc.heading(3, "Cost")
            doc.table(*self.cost_table(label))
            for path, caption in self.figures_for(label):
                doc.image(path, caption)
        if failed:
            doc.heading(2, "Failed or interrupted runs")
            doc.bullets([f"`{r.cell.id}`: {(r.summary or {}).get('error')}" for r in failed])
        doc.heading(2, "Methods")
        doc.table(["method", "its keys", "personalized model"],
                  [[m, ", ".join(f"{k}={v!r}" for k, v in keys.items()) or "(base)",
                    self.personal_model(m)] for m, keys in spec.methods.items()])
        doc.para("Shared keys ([base]): " + (", ".join(f"{k}={v!r}" for k, v in spec.base.items())
                                            or "none") + ".")
        return doc

    def write(self, command: str | None = None) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        for old in self.dir.glob("*.png"):
            old.unlink()
        rows = [csv_row(r, self.spec.target_accuracy) for r in self.results]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(self.dir / "results.csv", buf.getvalue().encode())
        doc = self.document(command)
        atomic_write(self.dir / "report.md", doc.markdown().encode())
        atomic_write(self.dir / "report.html", doc.html(self.spec.title).encode())
        return self.dir


def _machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.machine()} with {os.cpu_count()} CPU cores, load average "
            f"{load:.1f} when the report was written (a shared machine inflates wall times)")


def write_report(spec: BenchSpec, out: str | Path, command: str | None = None) -> Path:
    """Write ``<out>/report/`` from the cells under ``out``; returns the report folder."""
    bench = Path(out) / "bench.json"
    if command is None and bench.is_file():
        command = json.loads(bench.read_text()).get("command")
    return Report(spec, Path(out)).write(command)
