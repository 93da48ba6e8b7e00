"""The tables ``bench.patchsearch_repro`` prints (and the README records) from its cached stage results."""

from __future__ import annotations

import argparse
from typing import Any

from bench.common import machine

TARGET = "circle"
PROBE = 0.1  # labelled share of the attack evaluation's linear probe


def table(results: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [f"PatchSearch toy reproduction ({machine()}): shapes 16 px, {args.train} train images, SimCLR "
             f"{args.backbone} {args.epochs} epochs; trigger 5 px on 100% of '{TARGET}'", "",
             "| model | 20-NN acc | FP target clean | FP target patched (of non-target test) |",
             "| --- | --- | --- | --- |"]
    for name in ("clean", "poisoned"):
        if f"attack-{name}" not in results:
            continue
        a = results[f"attack-{name}"]
        lines.append(f"| {name}-data model | {a['knn20_acc']:.3f} | {a['fp_clean']:.0f} | {a['fp_patched']:.0f} "
                     f"(of {a['patched_test']:.0f}) |")
    lines += ["", "| PatchSearch run | images | poisons | scored | rounds | top-5 / 10 / 20 / 50 / 100 prec. | "
              "best score (z) | classifier val F1 | flagged | removed | poisons removed | recall | precision | "
              "clean removed | score AUROC | seconds |",
              "| --- |" + " --- |" * 15]
    for name, label in (("ps-poisoned", "poisoned data, poisoned model"), ("ps-clean", "clean data, clean model")):
        if name not in results:
            continue
        r = results[name]["result"]
        tops = " / ".join(f"{r[f'top{k}_precision']:.2f}" if f"top{k}_precision" in r else "-"
                          for k in (5, 10, 20, 50, 100))
        pois = r.get("poisons", 0.0)
        clean_removed = r.get("clean_removed_fraction", r["images_removed"] / r["images"])
        lines.append(
            f"| {label} | {r['images']:.0f} | {pois:.0f} | {r['scored_fraction']:.1%} | {r['search_rounds']:.0f} | "
            f"{tops if pois else '-'} | {r['best_score']:.0f} ({r.get('best_score_z', float('nan')):.1f}) | "
            f"{r.get('classifier_val_f1', float('nan')):.2f} | {r.get('images_flagged', float('nan')):.0f} | "
            f"{r['images_removed']:.0f} | {r.get('poisons_removed', 0):.0f} | "
            f"{r.get('removal_recall', float('nan')):.2f} | {r.get('removal_precision', float('nan')):.2f} | "
            f"{clean_removed:.1%} | {r.get('score_auroc', float('nan')):.2f} | {r['seconds_total']:.0f} |")
    for name in ("ps-poisoned", "ps-clean"):
        if name in results:
            lines.append(f"\n{name}: {results[name]['report'].get('decision', '')}")
    base = results.get("ps-poisoned", {}).get("result", {}).get("poison_base_rate")
    if base is not None:
        lines.append(f"\npoison base rate {base:.1%}; PatchSearch settings: {args.clusters} clusters, "
                     f"{args.test_images} test images, window 6, 2 samples/round, 25% pruned/round, "
                     f"{args.models} classifiers x {args.iterations} iterations")
    lines += ["", "Every model the same way (patched = the non-target test images with the trigger; FP = those "
                  "predicted as the target; ASR = FP / non-target; in brackets the no-trigger rate). Eval `attack` "
                  f"protocol with three linear probes: on a clean {PROBE:.0%} (the default), on every clean training "
                  "image, on every training image with the poisons included; and the 20-NN check with the poisoned "
                  "/ the clean training set as the labelled database:", "",
              "| model | probe clean 10 %: clean acc / patched acc / FP | probe all clean: clean acc / FP | probe with "
              "poisons: clean acc / patched acc / FP / ASR (no trigger) | 20-NN, poisoned DB: acc / FP clean -> "
              "patched | 20-NN, clean DB: acc / FP clean -> patched |", "| --- | --- | --- | --- | --- | --- |"]
    labels = {"clean": "clean-data model (SimCLR)", "poisoned": "poisoned model (SimCLR)",
              "defended": f"PatchSearch-defended (MoCo v2 + i-CutMix, filtered data, {args.epochs} epochs)",
              "kd": f"KD-defended (CompRess of the poisoned model, clean {args.kd_fraction:.0%}, {args.kd_epochs} "
                    "epochs)",
              "control-simclr-filtered": "control: SimCLR (the poisoned model's recipe) on the filtered data",
              "control-icutmix-poisoned": "control: MoCo v2 + i-CutMix on the unfiltered poisoned data"}
    for name, label in labels.items():
        keys = [f"{k}-{name}" for k in ("eval", "eval100", "evalp")] + [f"knn-{name}-{db}" for db in ("poisoned",
                                                                                                   "clean")]
        if not all(k in results for k in keys):
            continue
        e, f, g, a, b = (results[k] for k in keys)
        lines.append(
            f"| {label} | {e['attack_clean_acc']:.3f} / {e['attack_patched_acc']:.3f} / {e['attack_fp_clean']:.0f} -> "
            f"{e['attack_fp_patched']:.0f} | {f['attack_clean_acc']:.3f} / {f['attack_fp_clean']:.0f} -> "
            f"{f['attack_fp_patched']:.0f} | {g['attack_clean_acc']:.3f} / {g['attack_patched_acc']:.3f} / "
            f"{g['attack_fp_clean']:.0f} -> {g['attack_fp_patched']:.0f} / {g['attack_asr']:.3f} "
            f"({g['attack_asr_clean']:.3f}) | {a['knn20_acc']:.3f} / {a['fp_clean']:.0f} -> {a['fp_patched']:.0f} | "
            f"{b['knn20_acc']:.3f} / {b['fp_clean']:.0f} -> {b['fp_patched']:.0f} |")
    for prefix, probe in (("block", f"probe on a clean {PROBE:.0%}"),
                          ("blockp", "probe on every training image, poisons included")):
        if f"{prefix}-black" not in results:
            continue
        b = results[f"{prefix}-black"]
        lines += ["", f"Test-time blocking on the poisoned {args.backbone} (attention-gradient rollout, window = "
                      f"trigger side {b['attack_block_size']:.0f} px; {probe}):", "",
                  "| | clean acc | patched acc | ASR | trigger hit | random block: clean acc / patched acc / ASR |",
                  "| --- | --- | --- | --- | --- | --- |",
                  f"| no defense | {b['attack_clean_acc']:.3f} | {b['attack_patched_acc']:.3f} | "
                  f"{b['attack_asr']:.3f} | - | - |"]
        for fill in ("black", "mean"):
            r = results.get(f"{prefix}-{fill}")
            if r is not None:
                lines.append(f"| rollout block, {fill} fill | {r['attack_block_clean_acc']:.3f} | "
                             f"{r['attack_block_patched_acc']:.3f} | {r['attack_block_asr']:.3f} | "
                             f"{r['attack_trigger_hit_rate']:.3f} | {r['attack_random_block_clean_acc']:.3f} / "
                             f"{r['attack_random_block_patched_acc']:.3f} / {r['attack_random_block_asr']:.3f} |")
    return "\n".join(lines)
