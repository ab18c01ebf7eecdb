"""The dataset card (README.md) of an export, generated from the root's markers and what was exported.

The YAML header is what the Hugging Face Hub reads (license, task categories, size category, configs/data
files) plus a `caprl` block with the run's figures; the body says the same in prose and tables: URLs, images
kept and dropped by reason, captions and their length distribution, the captioner (name, revision, weights
digest), the exact prompt and sampling settings, the qa and reward settings, the trained model's lineage, the
evaluate scores, the export's filters and the code versions. Every number comes from a committed marker, a
committed report, or the exported rows themselves.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import yaml

from pipeline.publish.rows import Selection, Tally
from pipeline.publish.source import CommittedSource, annotate_settings
from pipeline.storage import code_version

HUB_LICENSES = {"apache-2.0", "mit", "cc0-1.0", "cc-by-4.0", "cc-by-sa-4.0", "cc-by-nc-4.0", "cc-by-nc-sa-4.0",
                "cc-by-nd-4.0", "cc-by-nc-nd-4.0", "cc-by-2.0", "cc-by-sa-3.0", "cc-by-3.0", "odc-by", "odbl",
                "pddl", "openrail", "other", "unknown", "gpl-3.0", "bsd-3-clause", "cdla-permissive-2.0"}
"""License ids the Hub accepts that image-text sources commonly carry; anything else is 'other'."""


def size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                        (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M")):
        if n < limit:
            return name
    return "100M<n<1B"


def distribution(counts: Counter[int]) -> dict[str, float] | None:
    """min, p10, median, mean, p90, max of values given as value -> count."""
    total = sum(counts.values())
    if not total:
        return None
    values = sorted(counts)

    def pct(q: float) -> int:
        target, seen = q * (total - 1), 0
        for v in values:
            seen += counts[v]
            if seen > target:
                return v
        return values[-1]

    mean = sum(v * n for v, n in counts.items()) / total
    return {"min": values[0], "p10": pct(0.1), "median": pct(0.5), "mean": round(mean, 2), "p90": pct(0.9),
            "max": values[-1], "rows": total}


def license_header(licenses: Counter[str]) -> tuple[dict[str, Any], list[str]]:
    """The card's license fields and warnings: one licence -> its id, several -> 'other' (counts in the body),
    none known -> 'unknown' with a warning."""
    known = {k: v for k, v in licenses.items() if k != "unknown"}
    warnings = []
    if not known:
        warnings.append("no row has a source licence (source_license); the card says license: unknown. Keep the "
                        "source's licence column (download.save_additional_columns: [license]) to carry it.")
        return {"license": "unknown"}, warnings
    if licenses.get("unknown"):
        warnings.append(f"{licenses['unknown']} exported row(s) have no source licence")
    if len(licenses) == 1:
        (name,) = known
        ident = name.strip().lower().replace(" ", "-")
        return ({"license": ident} if ident in HUB_LICENSES else {"license": "other", "license_name": name}), warnings
    return {"license": "other", "license_name": "mixed: see the per-licence row counts"}, warnings


def _sum_rows(markers: dict[str, dict[str, Any]], field: str) -> int:
    return sum(int((m.get("rows") or {}).get(field, 0)) for m in markers.values())


def _errors(markers: dict[str, dict[str, Any]]) -> dict[str, int]:
    out: Counter[str] = Counter()
    for m in markers.values():
        for reason, n in ((m.get("stats") or {}).get("errors") or {}).items():
            out[reason] += int(n)
    return dict(out.most_common())


def _distinct(values: list[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def _digest(model_id: str) -> str | None:
    return model_id.split("#sha256:", 1)[1] if "#sha256:" in model_id else None


def facts(source: CommittedSource, tally: Tally, sel: Selection, fmt: str) -> dict[str, Any]:
    """Everything the card states, as data (the `caprl` block of the header holds the numeric part)."""
    download, annotate = source.stage_markers("download"), source.markers
    qa, train, evaluate = source.stage_markers("qa"), source.stage_markers("train"), source.stage_markers("evaluate")
    settings = [annotate_settings(m) for m in annotate.values()]
    captioners = _distinct([s.get("captioner") or {} for s in settings])
    out: dict[str, Any] = {
        "format": fmt,
        "urls": _sum_rows(download, "total"),
        "images_kept": _sum_rows(download, "ok"),
        "images_dropped": _errors(download),
        "download_shards": len(download),
        "caption_shards": len(annotate),
        "captions_rows": _sum_rows(annotate, "total"),
        "captions_ok": _sum_rows(annotate, "ok"),
        "captions_failed": _errors(annotate),
        "exported_rows": tally.rows,
        "matched_rows": tally.matched,
        "duplicates_dropped": tally.duplicates,
        "licenses": dict(tally.licenses.most_common()),
        "caption_chars": distribution(tally.chars),
        "caption_tokens": distribution(tally.tokens),
        "quality_mean": round(tally.quality_sum / tally.quality_n, 4) if tally.quality_n else None,
        "quality_rows": tally.quality_n,
        "models": dict(tally.models.most_common()),
        "prompts": _distinct([s.get("prompt") for s in settings if s.get("prompt")]),
        "sampling": _distinct([s.get("sampling") for s in settings if s.get("sampling")]),
        "abstention": _abstention(annotate, settings),
        "captioners": captioners,
        "quality_settings": _distinct([{"quality": s.get("quality"), "reward": s.get("reward")} for s in settings]),
        "qa": {"shards": len(qa), "rows": _sum_rows(qa, "total"), "ok": _sum_rows(qa, "ok"),
               "settings": _distinct([(m.get("config") or {}).get("section") for m in qa.values()])} if qa else None,
        "lineage": _lineage(train, captioners),
        "evaluate": _evaluate(source, evaluate),
        "filters": sel.describe(),
        "code_versions": dict(Counter(str(m.get("code_version")) for st in (download, qa, train, annotate, evaluate)
                                      for m in st.values()).most_common()),
        "export_code_version": code_version(),
    }
    return out


def _abstention(annotate: dict[str, dict[str, Any]], settings: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The abstention gate's thresholds and what it dropped over the run (None: never on)."""
    thresholds = _distinct([s.get("abstain_below") for s in settings if s.get("abstain_below")])
    if not thresholds:
        return None
    extra = [((m.get("stats") or {}).get("extra") or {}) for m in annotate.values()]
    return {"abstain_below": thresholds, "sentences_dropped": sum(int(e.get("abstained_sentences", 0)) for e in extra),
            "rows_ungated": sum(int(e.get("ungated", 0)) for e in extra)}


def _lineage(train: dict[str, dict[str, Any]], captioners: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The train units a captioner named 'train:<unit>' came from: how they were made."""
    if not any(str(c.get("model") or "").startswith("train:") for c in captioners):
        return None
    out = []
    for unit, m in train.items():
        section = (m.get("config") or {}).get("section") or {}
        extra = (m.get("stats") or {}).get("extra") or {}
        item = {"unit": unit, "committed_at": m.get("committed_at"), "mode": extra.get("mode") or
                ("load" if section.get("load") else "rl")}
        if section.get("load"):
            item.update(source=section.get("load"), model_id=extra.get("model_id"))
        else:
            item.update(policy=(section.get("policy") or {}).get("model"), algorithm=section.get("algorithm"),
                        steps=extra.get("steps"), last_step=extra.get("last_step"), reward=section.get("reward"))
        out.append(item)
    return out


def _evaluate(source: CommittedSource, evaluate: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """unit -> {captioner: {mean, best_of_k}} from each committed evaluate unit's report.json."""
    out = {}
    for unit, m in evaluate.items():
        rel = f"{m.get('artifact') or f'eval/{unit}'}/report.json"
        report = source.read_json(rel) if rel in m.get("outputs", {}) else None
        if report:
            out[unit] = {name: {"mean": c.get("mean"), "best_of_k": c.get("best_of_k")}
                         for name, c in (report.get("captioners") or {}).items()}
    return out or None


def header(f: dict[str, Any], data_files: str | None) -> tuple[dict[str, Any], list[str]]:
    lic, warnings = license_header(Counter(f["licenses"]))
    head: dict[str, Any] = {
        **lic,
        "pretty_name": "Dense captions (caprl-pipeline)",
        "task_categories": ["image-to-text"],
        "language": ["en"],
        "size_categories": [size_category(f["exported_rows"])],
        "tags": ["image-captioning", "dense-captions", "caprl", "synthetic-captions"],
    }
    if data_files:
        head["configs"] = [{"config_name": "default", "data_files": [{"split": "train", "path": data_files}]}]
    head["caprl"] = {k: f[k] for k in ("urls", "images_kept", "images_dropped", "captions_rows", "captions_ok",
                                        "captions_failed", "exported_rows", "matched_rows", "duplicates_dropped",
                                        "licenses", "caption_chars", "caption_tokens", "quality_mean", "filters")}
    return head, warnings


def _table(rows: list[tuple[Any, ...]], names: tuple[str, ...]) -> str:
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _code(value: Any) -> str:
    return "```json\n" + json.dumps(value, indent=2, sort_keys=True, default=str) + "\n```"


def body(f: dict[str, Any]) -> str:
    """The card's prose: the run as it happened."""
    parts = ["# Dense captions made with caprl-pipeline", "",
             f"{f['exported_rows']} image-caption pairs ({f['format']} export). Generated by "
             "`python -m pipeline export` from the committed shards of one run; every figure below is read from "
             "the run's commit markers, reports and the exported rows.", "", "## How the data was made", ""]
    dropped = ", ".join(f"{k} {v}" for k, v in f["images_dropped"].items()) or "none"
    failed = ", ".join(f"{k} {v}" for k, v in f["captions_failed"].items()) or "none"
    parts += [f"- URLs: {f['urls']} in {f['download_shards']} download shard(s)",
              f"- images kept: {f['images_kept']}; dropped: {dropped}",
              f"- captions: {f['captions_ok']} ok of {f['captions_rows']} rows in {f['caption_shards']} shard(s); "
              f"failed: {failed}",
              f"- exported: {f['exported_rows']} of {f['matched_rows']} matching rows; "
              f"{f['duplicates_dropped']} duplicate image(s) dropped (same sha256)", ""]
    if len(f["licenses"]) > 1 or "unknown" in f["licenses"]:
        parts += ["### Licences (per exported row)", "",
                  _table(list(f["licenses"].items()), ("licence", "rows")), ""]
    else:
        parts += [f"All exported rows carry the source licence `{next(iter(f['licenses']))}`.", ""]
    parts += ["## Captions", ""]
    for col, label in (("caption_chars", "characters"), ("caption_tokens", "tokens")):
        d = f[col]
        if d:
            parts.append(f"- length in {label}: min {d['min']}, p10 {d['p10']}, median {d['median']}, mean {d['mean']}, "
                         f"p90 {d['p90']}, max {d['max']} ({d['rows']} rows)")
    if f.get("abstention"):
        a = f["abstention"]
        parts.append(f"- abstention gate (`annotate.abstain_below` {', '.join(map(str, a['abstain_below']))}): "
                     f"{a['sentences_dropped']} sentence(s) the captioner wrote below that probability were dropped "
                     f"(kept in the manifests' `abstained` column); rows with every sentence dropped are failed rows "
                     f"(`abstained`); {a['rows_ungated']} ok row(s) came without token probabilities and were not gated")
    if f["quality_mean"] is not None:
        parts.append(f"- quality (CapRL reward of the scored rows): mean {f['quality_mean']} over {f['quality_rows']} rows")
    parts += ["", "## Captioner", ""]
    parts += [_table([(m, n, _digest(m) or "n/a") for m, n in f["models"].items()], ("model_id", "rows", "weights sha256")), ""]
    for c in f["captioners"]:
        parts.append(f"- settings: backend `{c.get('backend')}`, model `{c.get('model')}`, revision "
                     f"`{c.get('revision') or 'n/a'}`")
    parts += ["", "Prompt (exact text):", ""]
    parts += ["```text\n" + p + "\n```" for p in f["prompts"]] + ["", "Sampling:", "", _code(f["sampling"]), ""]
    parts += ["## Quality monitor and reward settings", "", _code(f["quality_settings"]), ""]
    if f["qa"]:
        parts += ["## Questions (qa stage)", "", f"{f['qa']['shards']} qa shard(s), {f['qa']['ok']} ok rows of "
                  f"{f['qa']['rows']}.", "", _code(f["qa"]["settings"]), ""]
    if f["lineage"] is not None:
        parts += ["## Trained captioner lineage", "", _code(f["lineage"]), ""]
    if f["evaluate"]:
        parts += ["## Evaluation", ""]
        for unit, caps in f["evaluate"].items():
            rows = [(n, _fmt(s["mean"]), _fmt(s["best_of_k"])) for n, s in caps.items()]
            parts += [f"`{unit}`:", "", _table(rows, ("captioner", "mean accuracy", "best of k")), ""]
    parts += ["## Export", "", f"- filters: {_filters(f['filters'])}",
              f"- code versions of the run: {', '.join(f'{k} ({v} units)' for k, v in f['code_versions'].items())}",
              f"- exported by: {f['export_code_version']}", ""]
    return "\n".join(parts)


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _filters(sel: dict[str, Any]) -> str:
    parts = [f"where `{sel['where']}`" if sel["where"] else "no --where",
             f"limit {sel['limit']}" if sel["limit"] is not None else "no limit",
             f"shards {sel['shards']}" if sel["shards"] is not None else "all committed shards",
             "dedup by image sha256" if sel["dedup_sha256"] else "no dedup"]
    return ", ".join(parts)


def dataset_card(source: CommittedSource, tally: Tally, sel: Selection, fmt: str,
                 data_files: str | None) -> tuple[str, list[str]]:
    """The README.md text and the warnings to print (e.g. an unknown licence)."""
    f = facts(source, tally, sel, fmt)
    head, warnings = header(f, data_files)
    text = "---\n" + yaml.safe_dump(head, sort_keys=False, allow_unicode=True) + "---\n\n" + body(f)
    return text, warnings
