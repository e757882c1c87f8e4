"""PNG plots drawn from metrics.jsonl records (matplotlib, no display needed)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; a training node has no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy  # noqa: E402

from megatron_fold.train.metrics import loss_agreement  # noqa: E402

__all__ = ["plot_loss", "plot_expert_load", "plot_drop_fraction", "plot_compare", "plot_all"]


def plot_loss(records: list[dict], path: str, title: str = "loss") -> str:
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train")
    valid = [r for r in records if r.get("valid_loss") is not None]
    if valid:
        ax.plot([r["step"] for r in valid], [r["valid_loss"] for r in valid], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _moe_series(records: list[dict]):
    with_moe = [r for r in records if r.get("moe")]
    layers = sorted({int(k) for r in with_moe for k in r["moe"]})
    return with_moe, layers


def plot_expert_load(records: list[dict], path: str) -> str | None:
    """Layer x expert heat map of the share of tokens each expert received, one panel per third of
    training (early, middle, late), so drift in the load balance shows."""
    with_moe, layers = _moe_series(records)
    if not with_moe:
        return None
    thirds = [with_moe[i * len(with_moe) // 3:(i + 1) * len(with_moe) // 3] or with_moe for i in range(3)]
    fig, axes = plt.subplots(1, 3, figsize=(12, 1.2 + 0.45 * len(layers)), sharey=True)
    for ax, part, name in zip(axes, thirds, ("early", "middle", "late")):
        share = []
        for layer in layers:
            counts = numpy.sum([r["moe"][str(layer)]["tokens_per_expert"] for r in part], axis=0).astype(float)
            share.append(counts / max(counts.sum(), 1.0))
        image = ax.imshow(numpy.array(share), aspect="auto", cmap="viridis", vmin=0.0)
        ax.set_title(f"{name}: steps {part[0]['step']}-{part[-1]['step']}")
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(layers)), [f"layer {layer}" for layer in layers])
    fig.colorbar(image, ax=axes, label="share of routed tokens")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_drop_fraction(records: list[dict], path: str) -> str | None:
    with_moe, layers = _moe_series(records)
    if not with_moe:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for layer in layers:
        ax.plot([r["step"] for r in with_moe], [r["moe"][str(layer)]["dropped_fraction"] for r in with_moe],
                label=f"layer {layer}")
    ax.set_xlabel("step")
    ax.set_ylabel("fraction of routed tokens dropped")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_compare(runs: dict[str, list[dict]], path: str) -> str:
    """Loss curves of several layouts in one plot, with their largest difference in the title."""
    fig, ax = plt.subplots(figsize=(7, 4))
    styles = ["-", "--", ":", "-."]
    for i, (name, records) in enumerate(runs.items()):
        ax.plot([r["step"] for r in records], [r["loss"] for r in records], styles[i % len(styles)], label=name)
    relative, parted = loss_agreement(runs, rtol=1e-5)
    ax.set_title(f"same model, same batches: within 1e-5 for {parted} of {len(relative)} steps, "
                 f"largest difference {max(relative, default=0.0):.1e}", fontsize="medium")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_all(records: list[dict], out_dir: str, title: str) -> list[str]:
    import os

    made = [plot_loss(records, os.path.join(out_dir, "loss.png"), title),
            plot_expert_load(records, os.path.join(out_dir, "expert_load.png")),
            plot_drop_fraction(records, os.path.join(out_dir, "drop_fraction.png"))]
    return [p for p in made if p]
