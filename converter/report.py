"""The human report (``report.md``) and the machine summary (``--json``) of one conversion."""

from __future__ import annotations

from typing import Any

__all__ = ["render_markdown", "summary"]


def _pct(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}%"


def _num(v: Any, fmt: str = ".4f") -> str:
    return "-" if v is None else format(v, fmt)


def _kb(v: Any) -> str:
    return "-" if v is None else f"{v / 1024:.1f} KB"


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The few numbers a script wants: where the artifact is, whether it may ship, and why not."""
    chosen = report.get("chosen") or {}
    metrics = chosen.get("metrics") or {}
    return {"out": report["out"], "deployable": report["deployable"], "reasons": report["reasons"],
            "name": report["name"], "version": report["version"], "profile": report["profile"],
            "recipe": chosen.get("name"), "size": chosen.get("size"), "gzip_size": chosen.get("gzip_size"),
            "float_size": report["float"]["size"], "top1_agreement_pct": metrics.get("top1_agreement_pct"),
            "accuracy_pct": metrics.get("accuracy_pct"), "float_accuracy_pct": metrics.get("float_accuracy_pct"),
            "min_cosine": min((metrics.get("cosine") or {"-": None}).values(), default=None),
            "host_latency_ms": chosen.get("host_latency_ms"), "signed": report["signed"]}


def _breakdown_rows(fl: dict[str, Any] | None, ch: dict[str, Any] | None) -> list[str]:
    """Where the bytes are: per-channel quantization parameters and the graph do not shrink with the weights."""
    if not fl or not ch:
        return []
    rows = [("weights", "weights"), ("int32 biases", "bias"), ("quantization scales", "quant_scales"),
            ("quantization zero points (int64)", "quant_zero_points"), ("graph (ops, shapes, names)", "graph")]
    return [f"| - {label} | {_kb(fl[key])} | {_kb(ch[key])} |" for label, key in rows]


def render_markdown(report: dict[str, Any]) -> str:
    """A table a person can read in ten seconds, then the details."""
    fl, ch = report["float"], report.get("chosen") or {}
    m = ch.get("metrics") or {}
    verdict = "**deployable**" if report["deployable"] else "**NOT deployable**: " + "; ".join(report["reasons"])
    lines = [
        f"# {report['name']} {report['version']} for profile `{report['profile']}`",
        "",
        (f"Source: `{report['source']['path']}` ({report['source']['format']}), converted {report['created']} "
         f"by {report['converter_version']}. Verdict: {verdict}."),
        "",
        "| | float32 | chosen: " + str(ch.get("name")) + " |",
        "|---|---|---|",
        f"| size | {_kb(fl['size'])} | {_kb(ch.get('size'))} |",
        f"| gzip size | {_kb(fl['gzip_size'])} | {_kb(ch.get('gzip_size'))} |",
        *_breakdown_rows(fl.get("size_breakdown"), ch.get("size_breakdown")),
        f"| top-1 accuracy | {_pct(m.get('float_accuracy_pct'))} | {_pct(m.get('accuracy_pct'))} |",
        f"| top-1 agreement with float | 100% | {_pct(m.get('top1_agreement_pct'))} |",
        "| min output cosine | 1 | " + _num(min((m.get("cosine") or {"-": None}).values(), default=None)) + " |",
        (f"| host latency (this machine, 1 thread, not the device) | {_num(fl.get('host_latency_ms'), '.3f')} ms "
         f"| {_num(ch.get('host_latency_ms'), '.3f')} ms |"),
        "",
        (f"Fidelity target ({report['profile']}): top-1 drop <= {report['target']['max_top1_drop_pct']} points, "
         f"agreement >= {report['target']['min_top1_agreement_pct']}%, cosine >= {report['target']['min_cosine']}. "
         f"Measured on {m.get('samples', '-')} held-out samples ({report['eval_source']})."),
        "",
        "## Recipes tried",
        "",
        "| recipe | size | gzip | agreement | accuracy | cosine | SNR dB | integer only | host ms | result |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["recipes"]:
        rm = r.get("metrics") or {}
        cos = min((rm.get("cosine") or {"-": None}).values(), default=None)
        snr = min((rm.get("snr_db") or {"-": None}).values(), default=None)
        result = r.get("error") or ("meets target" if not r.get("misses") else "; ".join(r["misses"]))
        lines.append(f"| {r['name']} | {_kb(r.get('size'))} | {_kb(r.get('gzip_size'))} | "
                     f"{_pct(rm.get('top1_agreement_pct'))} | {_pct(rm.get('accuracy_pct'))} | {_num(cos)} | "
                     f"{_num(snr, '.1f')} | {'yes' if r.get('full_integer') else 'no'} | "
                     f"{_num(r.get('host_latency_ms'), '.3f')} | {result} |")
    eq = report.get("equalization")
    if eq:
        lines += ["", (f"Cross-layer equalization (per-tensor recipes): {eq['pairs']} layer pairs, {eq['channels']} "
                       f"channels rescaled so one weight scale per tensor fits them all ({eq['pinned']} left alone "
                       f"because they reach a ReLU cap); then the expected rounding error of per-tensor weights "
                       f"removed from the output offsets of {eq.get('bias_corrected', 0)} layers.")]
    lines += ["", f"Tensor names: {report.get('tensor_names', 'kept')}."]
    pr = report.get("pruning")
    if pr:
        lines += ["", "## Pruning", "",
                  (f"Parameters {pr['params_before']} -> {pr['params_after']}; kernel sparsity "
                   f"{_num(pr.get('sparsity'), '.2f')}; fine-tuned {pr['finetune_epochs']} epochs by distillation."),
                  ""]
        for layer, kept in pr["pruned_layers"].items():
            lines.append(f"- `{layer}`: kept {kept} filters")
        for item in pr["skipped"]:
            lines.append(f"- left untouched: {item}")
    lines += ["", "## Ops", ""]
    non_int = ch.get("non_integer_ops") or []
    lines.append("Non-integer ops in the chosen model: " + (", ".join(non_int) if non_int else "none") + ".")
    ops = ch.get("op_counts") or {}
    lines.append("Op counts: " + ", ".join(f"{k} x{v}" for k, v in ops.items()) + ".")
    tpu = report.get("edgetpu")
    if tpu:
        lines += ["", "## Edge TPU", "",
                  "Static check: " + ("all ops map to the Edge TPU" if tpu["static_ok"]
                                      else "ops that would run on the CPU: " + ", ".join(tpu["cpu_ops"])),
                  "", tpu["note"] + "."]
        for p in tpu["problems"]:
            lines.append(f"- {p}")
    g = report.get("golden") or {}
    lines += ["", "## Device health check", "",
              (f"{g.get('count', 0)} golden samples, atol {g.get('atol')} (measured int8-vs-float error "
               f"{_num(g.get('measured_error'))})."), ""]
    return "\n".join(lines)
