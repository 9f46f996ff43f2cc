"""The study's report: paired deltas with 95% confidence intervals, the power stated in advance, where instances
land on the pyramid, the global discrepancy by method, ablations and the positive control (from study.json)."""
from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

from gkd.kd.config import HARD_CASES

__all__ = ["SUBSETS", "PAPER_TABLES", "summarize", "render_report", "t_quantile", "paired_ci",
           "detectable_effect"]

#: hard subsets: name -> annotation attribute (written by `gkd data synth`)
SUBSETS = HARD_CASES

#: The authors' COCO val2017 numbers (ECCV 2022, from their README; docs/method.md, section 4). Theirs,
#: not ours.
PAPER_TABLES = {
    "Faster R-CNN R101 -> R50 (2x)": [("Teacher R101", 39.8, 60.1, 43.3), ("Student R50", 38.4, 59.0, 42.0),
                                      ("FGFI", 39.3, 59.8, 42.9), ("DeFeat", 40.3, 60.9, 44.0),
                                      ("FBKD", 40.2, 60.4, 43.6), ("GID", 40.2, 60.8, 43.6),
                                      ("Global knowledge (ours in the paper)", 40.6, 61.0, 44.0)],
    "RetinaNet R101 -> R50 (2x)": [("Teacher R101", 38.9, 58.0, 41.5), ("Student R50", 37.4, 56.7, 39.6),
                                   ("FGFI", 38.6, 58.7, 41.3), ("DeFeat", 39.3, 58.2, 42.1),
                                   ("FBKD", 39.3, 58.3, 42.3), ("GID", 39.1, 59.0, 42.3), ("PFI", 39.6, None, None),
                                   ("Global knowledge (ours in the paper)", 39.8, 58.6, 42.6)],
}

# Student's t quantiles for 1..30 degrees of freedom (two-sided 95%: the 0.975 quantile; 80% power: the 0.80
# quantile), from the standard tables; beyond 30 the normal's.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
_T80 = (1.376, 1.061, 0.978, 0.941, 0.920, 0.906, 0.896, 0.889, 0.883, 0.879, 0.876, 0.873, 0.870, 0.868, 0.866,
        0.865, 0.863, 0.862, 0.861, 0.860, 0.859, 0.858, 0.858, 0.857, 0.856, 0.856, 0.855, 0.855, 0.854, 0.854)


def t_quantile(q: float, df: int) -> float:
    """Student's t quantile ``q`` (0.975 or 0.80) at ``df`` degrees of freedom (>= 1)."""
    table = {0.975: (_T975, 1.960), 0.80: (_T80, 0.8416)}[q]
    return table[0][df - 1] if df <= len(table[0]) else table[1]


def paired_ci(mean: float, std: float, n: int) -> tuple[float, float] | None:
    """95% confidence interval of a mean paired difference over ``n`` seeds (t with n - 1 df); None when n < 2."""
    if n < 2:
        return None
    half = t_quantile(0.975, n - 1) * std / math.sqrt(n)
    return mean - half, mean + half


def detectable_effect(sd: float, n: int) -> float:
    """The smallest true paired difference that a two-sided 5% test over ``n`` paired seeds finds with 80% power,
    when the paired differences have standard deviation ``sd``: ``(t_0.975 + t_0.80) * sd / sqrt(n)``."""
    return (t_quantile(0.975, n - 1) + t_quantile(0.80, n - 1)) * sd / math.sqrt(n) if n >= 2 else math.inf


def _pct(v: float | None) -> str:
    return "n/a" if v is None or v < 0 else f"{100 * v:.1f}"


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and v >= 0]
    if not values:
        return -1.0, 0.0
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _map(run: dict[str, Any]) -> float:
    return run["metrics"]["all"]["bbox_mAP"]


def _paired_delta(runs: list[dict[str, Any]], reference: list[dict[str, Any]],
                  value=_map) -> tuple[float, float, int] | None:
    """Mean and std over seeds of (this method's value - the reference method's value) at the same seed.

    Runs of one seed share the initialisation, data order and augmentation, so the per-seed difference removes the
    seed-to-seed variation both methods share; its std is the spread that a claimed gain has to beat.
    Returns None when the two methods share no seed."""
    ref = {r["seed"]: value(r) for r in reference}
    diffs = [value(r) - ref[r["seed"]] for r in runs if r["seed"] in ref]
    if not diffs:
        return None
    return statistics.fmean(diffs), (statistics.stdev(diffs) if len(diffs) > 1 else 0.0), len(diffs)


def summarize(study: dict[str, Any], kind: str = "main") -> list[dict[str, Any]]:
    """One row per method of the runs of ``kind`` (main or control): mean and std over seeds of each metric (in
    [0, 1]), and the paired per-seed mAP difference to `none` and to `local` (``vs_none`` / ``vs_local``: mean,
    std, number of seeds; ``ci_vs_none`` / ``ci_vs_local``: its 95% confidence interval, None under 2 seeds)."""
    rows = []
    runs_of_kind = [r for r in study["runs"] if r.get("kind") == kind]
    order = study["config"].get("methods" if kind == "main" else "control_methods", [])
    methods = [m for m in order if any(r["method"] == m for r in runs_of_kind)]
    by_method = {m: [r for r in runs_of_kind if r["method"] == m] for m in methods}
    for method in methods:
        runs = by_method[method]
        row = {"method": method, "seeds": sorted(r["seed"] for r in runs)}
        for key, (subset, metric) in {"mAP": ("all", "bbox_mAP"), "AP50": ("all", "bbox_mAP_50"),
                                      "AP75": ("all", "bbox_mAP_75"),
                                      **{f"AP_{s}": (s, "bbox_mAP") for s in SUBSETS}}.items():
            row[key] = _mean_std([r["metrics"][subset][metric] for r in runs])
        for ref in ("none", "local"):
            delta = None if method == ref else _paired_delta(runs, by_method.get(ref, []))
            row[f"vs_{ref}"] = delta
            row[f"ci_vs_{ref}"] = paired_ci(*delta) if delta else None
        rows.append(row)
    return rows


def _delta_cell(delta: tuple[float, float, int] | None, ci: tuple[float, float] | None = None) -> str:
    if delta is None:
        return "-"
    mean, std, n = delta
    text = f"{100 * mean:+.1f}" + (f" +- {100 * std:.1f}" if n > 1 else "")
    return text + (f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else "")


def _recipe(record: dict[str, Any] | None) -> str:
    """``ResNet-18 x0.5, FPN 128, seed 2, 2 x 100 steps of 8, AdamW lr 0.002``."""
    cfg = (record or {}).get("config") or {}
    if not cfg:
        return "given as a checkpoint"
    m, t = cfg["model"], cfg["train"]
    width = m.get("backbone_width", 1.0)
    return (f"{m['backbone']}{f' x{width:g}' if width != 1.0 else ''}, FPN {m.get('fpn_channels')}, box head "
            f"{m.get('box_head_dim')}, seed {cfg['seed']}, {t['epochs']} epoch(s) of "
            f"{t.get('max_steps_per_epoch') or 'all the'} steps of {t['batch_size']} images, {t['optimizer']} lr "
            f"{t['lr']:g} ({t['schedule']})")


def _model_line(name: str, record: dict[str, Any] | None) -> str:
    if not record:
        return f"- {name}: none"
    m = record["metrics"]
    took = f", {record['train_s'] / 60:.1f} min" if record.get("train_s") else ""
    return (f"- {name}: {_recipe(record)}: **{_pct(m['all']['bbox_mAP'])} mAP** ({_pct(m['all']['bbox_mAP_50'])} "
            f"AP50; small {_pct(m['small']['bbox_mAP'])}, occluded {_pct(m['occluded']['bbox_mAP'])}, blurred "
            f"{_pct(m['blurred']['bbox_mAP'])}){took}")


def _design(study: dict[str, Any]) -> list[str]:
    cfg = study["config"]
    t = study["teacher"]
    n = len(cfg["seeds"])
    sd = cfg.get("design_sd", 0.4)
    mde = detectable_effect(sd / 100, n) * 100
    val = cfg.get("synth_val_images")
    lines = ["## Design, stated before the runs", "",
             _model_line("Teacher", t), _model_line("Student initialisation (every student starts here)",
                                                    t.get("student_init")),
             _model_line("Control teacher (positive control, below)", t.get("control")), "",
             (f"Power: {n} paired seeds on {val or 'the'} val images. Assumed std of a paired mAP difference: "
              f"{sd:g} mAP points (0.68 measured over 13 paired seeds on 160 val images in the lineage-teacher "
              f"variants, docs/study_notes.md). A two-sided 5% test over {n} seeds "
              f"then detects a true difference of **{mde:.2f} mAP** with 80% power "
              f"((t_0.975 + t_0.80) x sd / sqrt(n)); the paper's margin over DeFeat is 0.3-0.5 mAP on COCO."
              if n >= 2 else f"Power: one seed on {val or 'the'} val images: no test and no interval; a one-seed "
              f"study shows the machinery and the direction of effects, not whether they are real."),
             "Targets: `gkd` - `none` >= +2 mAP; `gkd` - `local` > 0 with a 95% confidence interval that excludes "
             "0; the positive control's robust weights lower on the defective part.", ""]
    return lines


def _verdicts(rows: list[dict[str, Any]], sd_design: float) -> list[str]:
    row = next((r for r in rows if r["method"] == "gkd"), None)
    if row is None:
        return []
    out = []
    if row["vs_none"]:
        mean = 100 * row["vs_none"][0]
        out.append(f"- `gkd` - `none` = {_delta_cell(row['vs_none'], row['ci_vs_none'])}: "
                   f"{'meets' if mean >= 2 else 'misses'} the +2 mAP target.")
    if row["vs_local"]:
        mean, std, n = row["vs_local"]
        ci = row["ci_vs_local"]
        excl = ci is not None and (ci[0] > 0 or ci[1] < 0)
        out.append(f"- `gkd` - `local` = {_delta_cell(row['vs_local'], ci)}: " +
                   ("the interval excludes 0" if excl else "the interval includes 0 (no resolved difference)" if ci
                    else "one seed: no interval") +
                   (f"; observed paired std {100 * std:.2f} (assumed {sd_design:g}), so this design detects "
                    f"{100 * detectable_effect(std, n):.2f} mAP at 80% power." if n > 1 else "."))
    return out


def _levels(study: dict[str, Any]) -> list[str]:
    lv = study.get("levels") or {}
    if not lv:
        return []
    gkd_runs = [r for r in study["runs"] if r.get("kind") == "main" and r["method"] == "gkd"]
    lines = ["## Where the instances land", "",
             f"The level rule floor(log2(side / c)) with c = {lv['canonical']:.4g} px (56 px at COCO's 800 px, "
             f"scaled to the input), against mmdet's c = 56 px kept unscaled. Ground-truth boxes of "
             f"the training split, positive RoIs per step (a `gkd` run's log), and the mean robust weight of the "
             f"instances on each level (`gkd` runs, each instance at its own level):", "",
             "| level | GT boxes | GT boxes at 56 px | positive RoIs per step | robust weight |",
             "|---|---|---|---|---|"]
    for i, level in enumerate(lv["levels"]):
        rw = [r["diagnostics"].get(f"rw_{level}") for r in gkd_runs if r.get("diagnostics")]
        rw = [v for v in rw if v is not None]
        pos = lv.get("positives_per_step", {}).get(level)
        lines.append(f"| {level} (stride {level[1:] if level.startswith('s') else '?'}) | {lv['gt'][i]} | "
                     f"{lv['gt_at_56'][i]} | {f'{pos:.1f}' if pos is not None else '-'} | "
                     f"{f'{statistics.fmean(rw):.3f}' if rw else '-'} |")
    return lines + [""]


def _discrepancy(study: dict[str, Any]) -> list[str]:
    rows = []
    for m in study["config"]["methods"]:
        vals = [r["diagnostics"]["global_discrepancy"] for r in study["runs"]
                if r.get("kind") == "main" and r["method"] == m and "global_discrepancy" in r.get("diagnostics", {})]
        if vals:
            rows.append(f"| {m} | {statistics.fmean(vals):.4f} | {len(vals)} |")
    if not rows:
        return []
    return ["## Is the global term redundant with local imitation?", "",
            "The global discrepancy (the unweighted global loss: the student's and the teacher's cosine-similarity "
            "vectors to the prototypes, compared), logged in every run that has a teacher, with gradient only where "
            "the method has the global term; mean over epochs and seeds. If `local` drives it as low as `gkd`, "
            "local imitation already transfers the relations the global term asks for.", "",
            "| method | global discrepancy | seeds |", "|---|---|---|", *rows, ""]


def _ablations(study: dict[str, Any]) -> list[str]:
    abl = [r for r in study["runs"] if r.get("kind") == "ablation"]
    if not abl:
        return []
    main_gkd = [r for r in study["runs"] if r.get("kind") == "main" and r["method"] == "gkd"]
    lines = ["## Ablations of `gkd`", "",
             "Each against the main `gkd` run of the same seed (10 prototypes per class, global weight 5, "
             "BatchNorm in eval mode while prototypes are made, a refresh per epoch); `global` in the main table is "
             "the global loss alone (fg, bg and soft weights 0).", "",
             "| variant | seeds | mAP | delta vs gkd | AP small | robust weight |", "|---|---|---|---|---|---|"]
    variants = list(dict.fromkeys(r["variant"] for r in abl))
    for v in variants:
        runs = [r for r in abl if r["variant"] == v]
        m, s = _mean_std([_map(r) for r in runs])
        rw = [r.get("diagnostics", {}).get("robust_weight_mean") for r in runs]
        rw = [x for x in rw if x is not None]
        lines.append(f"| {v} | {', '.join(str(r['seed']) for r in runs)} | {_pct(m)} +- {100 * s:.1f} | "
                     f"{_delta_cell(_paired_delta(runs, main_gkd))} | "
                     f"{_pct(_mean_std([r['metrics']['small']['bbox_mAP'] for r in runs])[0])} | "
                     f"{f'{statistics.fmean(rw):.3f}' if rw else '-'} |")
    return lines + [""]


def control_part(study: dict[str, Any]) -> dict[str, Any] | None:
    """What the positive control made defective, from study.json: ``{"kind", "name", "title", "ap", "audit_key",
    "defect"}`` (``ap``: a run's AP on that part; ``audit_key``: its within-level contrast in the audit; ``defect``:
    what was done, in words), None without a control. "labels": one class's boxes, partly relabelled; "blind": the
    boxes of one tag, partly deleted."""
    bad = ((study["teacher"].get("control") or {}).get("corruption")) or {}
    if not bad:
        return None
    if bad.get("kind", "labels") == "blind":
        tag = bad["tag"]
        return {"kind": "blind", "name": tag, "title": f"`{tag}` objects", "audit_key": f"others - tag {tag}",
                "ap": lambda r: r["metrics"][tag]["bbox_mAP"],
                "defect": f"{bad['deleted']} of the {bad['annotations']} training boxes tagged `{tag}` deleted (the "
                          f"objects stay in the images, as background: {bad['images_left_empty']} images lost every "
                          f"box)"}
    name = bad["class"]
    return {"kind": "labels", "name": name, "title": f"class `{name}`", "audit_key": f"others - class {name}",
            "ap": lambda r: r["metrics"]["per_class"][name],
            "defect": f"{bad['relabelled']} of the {bad['annotations']} training boxes of class `{name}` relabelled to "
                      f"other classes"}


def _control(study: dict[str, Any]) -> list[str]:
    ctrl = study["teacher"].get("control")
    runs = [r for r in study["runs"] if r.get("kind") == "control"]
    part = control_part(study)
    if not ctrl or not runs or part is None:
        return []
    name, ap = part["name"], part["ap"]
    classes = list(runs[0]["metrics"]["per_class"])
    healthy = study["teacher"]

    def ap_other(r: dict[str, Any]) -> float:
        return _mean_std([v for k, v in r["metrics"]["per_class"].items() if k != name])[0]

    labels = part["kind"] == "labels"
    label = classes.index(name) + 1 if labels else None  # the corrupted class's id (training logs rw_c<id>)

    def rw(r: dict[str, Any], mine: bool) -> float | None:
        d = r.get("diagnostics", {})
        vals = [d.get(f"rw_c{c}") for c in range(1, len(classes) + 1) if (c == label) == mine]
        vals = [v for v in vals if v is not None]
        return statistics.fmean(vals) if vals else None

    def mean_of(values: list[float | None]) -> str:
        values = [v for v in values if v is not None]
        return f"{statistics.fmean(values):.3f}" if values else "-"

    lines = ["## Positive control: a teacher with a known defect", "",
             f"A second teacher, same recipe and seed, trained with {part['defect']}: "
             f"{_pct(ctrl['metrics']['all']['bbox_mAP'])} mAP, AP on {part['title']} {_pct(ap(ctrl))} (the healthy "
             f"teacher: {_pct(healthy['metrics']['all']['bbox_mAP'])} and {_pct(ap(healthy))}). Students from the same "
             f"initialisation distil from it. The robust module should give {part['title']} lower weights, and "
             f"`robust` / `gkd` should beat `local` on {part['title']}.", ""]
    if labels:  # training logs the robust weights per class, not per tag: a tag's weights are in the audit below
        lines += [f"| method | seeds | mAP | AP {name} | AP other classes | robust weight {name} | robust weight "
                  f"others |", "|---|---|---|---|---|---|---|"]
    else:
        lines += [f"| method | seeds | mAP | AP {name} | robust weight (all instances) |", "|---|---|---|---|---|"]
    methods = list(dict.fromkeys(r["method"] for r in runs))
    for m in methods:
        mine = [r for r in runs if r["method"] == m]
        cells = [m, ", ".join(str(r["seed"]) for r in mine), _pct(_mean_std([_map(r) for r in mine])[0]),
                 _pct(_mean_std([ap(r) for r in mine])[0])]
        if labels:
            cells += [_pct(_mean_std([ap_other(r) for r in mine])[0]), mean_of([rw(r, True) for r in mine]),
                      mean_of([rw(r, False) for r in mine])]
        else:
            cells.append(mean_of([r.get("diagnostics", {}).get("robust_weight_mean") for r in mine]))
        lines.append("| " + " | ".join(cells) + " |")
    # the same paired comparison on the healthy teacher's runs (the main grid), where it ran the same methods and
    # seeds: the control's effect is the difference between the two
    main = [r for r in study["runs"] if r.get("kind") == "main"]
    for label, group in (("control teacher", runs), ("healthy teacher", main)):
        local = [r for r in group if r["method"] == "local"]
        for m in methods:
            d = None if m == "local" or not local else _paired_delta([r for r in group if r["method"] == m], local,
                                                                      value=ap)
            if d:
                lines.append(f"\n`{m}` - `local` on {part['title']} (paired, {label}): "
                             f"{_delta_cell(d, paired_ci(*d))} AP.")
    return lines + [""]


def portable_paths(value: Any) -> Any:
    """``value`` with every absolute path inside the gkd package (the shipped configs) written relative to it, e.g.
    ``kd/configs/study/teacher.yaml``: a report does not record where one machine keeps its checkout."""
    from gkd.kd import CONFIG_DIR

    root = CONFIG_DIR.parent.parent  # the repository (or the installed package) holding kd/configs
    if isinstance(value, dict):
        return {k: portable_paths(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable_paths(v) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        try:
            return Path(value).resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            return value
    return value


def _audit(study: dict[str, Any]) -> list[str]:
    """The robust-weight audit: do the weights follow what each teacher gets wrong?"""
    audits = study.get("audits") or {}
    if not audits:
        return []

    def w(a: dict[str, Any], group: str) -> str:
        g = a["groups"].get(group)
        return f"{g['mean']:.3f} ({g['n']})" if g and g["n"] else "-"

    def d(v: float | None) -> str:
        return f"{v:+.3f}" if v is not None else "-"

    part = control_part(study)
    bad = part["name"] if part and part["kind"] == "labels" else None
    lines = ["## Do the robust weights follow the teacher's errors? (an audit)", "",
             "Each training instance's robust weight at its own level, at the students' start (the initialisation, "
             "and the prototypes of a run's first refresh), grouped by what the teacher does with the instance: its "
             "most confident detection that overlaps the box (IoU >= 0.5, score >= 0.05) has the right class, "
             "another class (confused), or there is none (missed). Mean weight (instances). The weights fall with "
             "the level (small boxes on the finest level), so the answer is the comparison within a level: the "
             "count-weighted mean over levels of the difference (`python -m gkd.kd.distill.audit`).", "",
             "| teacher | instances | right | confused | missed | within a level: right - confused | right - missed |",
             "|---|---|---|---|---|---|---|"]
    names = {"main": "teacher", "control": "control teacher" + (
        f" ({part['title']} {'corrupted' if bad else 'deleted'})" if part else "")}
    for kind, a in audits.items():
        lines.append(f"| {names.get(kind, kind)} | {a['instances']} | {w(a, 'teacher right')} | "
                     f"{w(a, 'teacher confused')} | {w(a, 'teacher missed')} | "
                     f"{d(a['within_level'].get('right - confused'))} | {d(a['within_level'].get('right - missed'))} |")
        if kind == "control" and bad:
            lines.append(f"| ... its `{bad}` boxes | {a['groups'].get(f'class {bad}', {}).get('n', 0)} | "
                         f"{w(a, f'class {bad} / teacher right')} | {w(a, f'class {bad} / teacher confused')} | "
                         f"{w(a, f'class {bad} / teacher missed')} | | |")
    first = next(iter(audits.values()))
    levels = sorted(k for k in first["groups"] if k.startswith("level ") and "/" not in k)
    lines += ["", "By level (the first audit): " + ", ".join(f"{k} {w(first, k)}" for k in levels) +
              f"; boxes tagged small {w(first, 'tag small')}, untagged {w(first, 'tag clean')}.", ""]
    key = part["audit_key"] if part else None
    if key and all(key in a["within_level"] for a in audits.values()):
        group = f"class {part['name']}" if part["kind"] == "labels" else f"tag {part['name']}"
        contrast = {kind: a["within_level"][key] for kind, a in audits.items()}
        lines += [f"The control's defective part, {part['title']}, against the other boxes on the same level (others - "
                  f"part: positive where the part weighs less): " + "; ".join(
                      f"{names.get(kind, kind)} {d(v)} ({part['title']} {w(audits[kind], group)})"
                      for kind, v in contrast.items()) + "."]
        if contrast.get("main") is not None and contrast.get("control") is not None:
            lines.append(f"The defect's own effect (control - healthy teacher): "
                         f"{d(contrast['control'] - contrast['main'])}.")
        cos_key = f"teacher cos: {key}"
        if all(a["within_level"].get(cos_key) is not None for a in audits.values()):
            lines.append("In the teacher's own features (the teacher's best cosine to its class's prototypes, one of "
                         "the two terms the weight compares; others - part within a level): " + "; ".join(
                             f"{names.get(kind, kind)} {d(a['within_level'][cos_key])}" for kind, a in audits.items())
                         + ".")
        lines.append("")
    return lines


def _stage_times_line(study: dict[str, Any]) -> list[str]:
    """Each stage's own time, also for stages a rerun reused: the wall time above is one invocation's only."""
    runs = [r for r in study["runs"] if "train_s" in r]
    if "train_s" not in study["teacher"] or not runs:
        return []
    init = study["teacher"].get("student_init")
    ctrl = study["teacher"].get("control")
    teacher = ("teacher given as a checkpoint (evaluated in {:.1f} min)" if study["config"].get("teacher_checkpoint")
               else "teacher {:.1f} min").format(study["teacher"]["train_s"] / 60)
    parts = [teacher, *([f"control teacher {ctrl['train_s'] / 60:.1f} min"] if ctrl else []),
             *([f"student initialisation {init['train_s'] / 60:.1f} min"] if init else []),
             f"{len(runs)} student runs {sum(r['train_s'] for r in runs) / 60:.1f} min in all "
             f"({study['config'].get('jobs', 1)} at a time)"]
    return ["Stage times, each measured when it ran (a rerun reuses finished stages, and the time above counts only "
            "its own invocation): " + ", ".join(parts) + ".", ""]


def render_report(study: dict[str, Any]) -> str:
    """The Markdown report: design and power, our table (mean +- std over seeds, paired deltas with 95% CIs),
    levels, global discrepancy, ablations, positive control, the paper's numbers, provenance."""
    rows = summarize(study)
    t = study["teacher"]["metrics"]
    cfg = study["config"]
    lines = ["# Distillation study on the embedded synthetic dataset", "",
             f"Generated by `{study['command'] or 'gkd study'}` in {study['wall_s'] / 60:.1f} min on "
             f"{study['machine']['processor']} ({study['machine']['cpus']} CPUs, torch {study['machine']['torch']}).",
             "COCO box AP (%) on the val split; mean +- std over seeds " + ", ".join(map(str, cfg["seeds"])) +
             "; every student run has the same schedule, data order and initialisation for a given seed.",
             "The deltas are paired: the mean +- std over seeds of (method - reference) at the same seed, and its "
             "95% confidence interval [t, n - 1 df].", "",
             *_stage_times_line(study),
             *(_design(study) if "design_sd" in cfg else []),
             "## Results", "",
             f"Teacher: {_pct(t['all']['bbox_mAP'])} mAP, {_pct(t['all']['bbox_mAP_50'])} AP50, "
             f"{_pct(t['all']['bbox_mAP_75'])} AP75 (small {_pct(t['small']['bbox_mAP'])}, occluded "
             f"{_pct(t['occluded']['bbox_mAP'])}, blurred {_pct(t['blurred']['bbox_mAP'])}).", "",
             "| method | mAP | AP50 | AP75 | delta vs none | delta vs local | AP small | AP occluded | AP blurred |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{100 * m:.1f} +- {100 * s:.1f}" if m >= 0 else "n/a"
                 for m, s in (r["mAP"], r["AP50"], r["AP75"])]
        subs = [f"{100 * r[f'AP_{s}'][0]:.1f} +- {100 * r[f'AP_{s}'][1]:.1f}" if r[f"AP_{s}"][0] >= 0 else "n/a"
                for s in SUBSETS]
        lines.append(f"| {r['method']} | {' | '.join(cells)} | {_delta_cell(r['vs_none'], r['ci_vs_none'])} | "
                     f"{_delta_cell(r['vs_local'], r['ci_vs_local'])} | {' | '.join(subs)} |")
    verdicts = _verdicts(rows, cfg.get("design_sd", 0.4))
    lines += ["", *verdicts, *([""] if verdicts else []),
              *_levels(study), *_discrepancy(study), *_ablations(study), *_control(study), *_audit(study),
              "What these numbers mean, why `gkd` does or does not beat `local` here, and the other study variants "
              "measured: docs/study_notes.md.", "",
              "## The paper's COCO numbers, for orientation (theirs, not ours)", "",
              "From the authors' README (COCO val2017, 2x schedules); not comparable in scale with the table above.",
              ""]
    for title, table in PAPER_TABLES.items():
        lines += [f"{title}:", "", "| method | mAP | AP50 | AP75 |", "|---|---|---|---|"]
        lines += [f"| {n} | {a} | {b if b is not None else '-'} | {c if c is not None else '-'} |"
                  for n, a, b, c in table]
        lines.append("")
    lines += ["## Provenance", "", "```json", json.dumps({"config": portable_paths(cfg), "machine": study["machine"]},
                                                        indent=1),
              "```", ""]
    return "\n".join(lines)
