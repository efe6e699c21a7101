"""`generate`, `convert`, `export`, `presets` and `mil`: commands on one model (or a MIL benchmark)."""

from __future__ import annotations

from pathlib import Path

from ..paths import locked


def cmd_generate(a) -> int:
    import torch

    from .. import load, load_tokenizer

    model = load(a.checkpoint, getattr(a, "dtype", "float32"), packed=a.packed)
    tok = load_tokenizer(a.checkpoint)
    ids = torch.tensor([tok.encode(a.prompt)])
    if ids.shape[1] + a.max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"--max-new-tokens {a.max_new_tokens} after a {ids.shape[1]}-token prompt exceeds the model's "
                         f"max_seq_len {model.cfg.max_seq_len}")  # fmt: skip
    gen = torch.Generator().manual_seed(a.seed)
    stop = (tok.eos_token_id,) if tok.eos_token_id is not None else ()
    out = model.generate(ids, a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, generator=gen,
                         stop_tokens=stop, prefill_chunk=getattr(a, "prefill_chunk", None))  # fmt: skip
    print(tok.decode(out[0].tolist()))
    return 0


def cmd_convert(a) -> int:
    from .. import load, load_tokenizer
    from ..convert import dense_to_moh, gqa_to_moa, upcycle_bam
    from ..models import checkpoint

    if len(a.sources) > 1 and a.to != "bam":
        raise ValueError(f"--to {a.to} takes one source model; only bam mixes several")
    _new_folder(a.out)
    models = [load(s) for s in a.sources]
    if a.to == "moa":
        new = gqa_to_moa(models[0], a.top_k)
    elif a.to == "moh":
        new = dense_to_moh(models[0], a.active_fraction)
    else:
        block = "parallel" if a.parallel else "sequential"
        new = upcycle_bam(models, attention=a.attention.replace("-", "_"), block=block)
    checkpoint.save(new, a.out, tokenizer=load_tokenizer(a.sources[0]), extra={"converted_from": a.sources})
    print(f"{a.to} model ({sum(p.numel() for p in new.parameters()):,} params) saved to {a.out}")
    return 0


def cmd_export(a) -> int:
    from .. import export, load, load_tokenizer

    _new_folder(a.out)
    out = export(load(a.source), a.out, format=a.format, tokenizer=load_tokenizer(a.source))
    print(f"{a.format} checkpoint written to {out}")
    return 0


def _new_folder(out) -> None:
    """An output folder of a save: it may not be an existing file, nor a folder holding something
    other than a checkpoint (which the atomic save replaces whole)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; a folder is expected")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise ValueError(f"--out {out} is a non-empty folder that holds no checkpoint; choose another folder")


def cmd_presets(a) -> int:
    from ..eval.report import markdown_table
    from ..models.config import PRESETS
    from ..models.decoder import MixtureLM, count_parameters

    rows = []
    for name, cfg in PRESETS.items():
        total, active = count_parameters(MixtureLM(cfg))
        rows.append({"name": name, "attention": cfg.attention, "ffn": cfg.ffn, "params": total, "active": active})
    cols = [("name", "preset"), ("attention", "attention"), ("ffn", "ffn"), ("params", "params"), ("active", "active")]
    print(markdown_table(rows, cols))
    return 0


def cmd_mil(a) -> int:
    from ..mil import BagsConfig, MILTrainConfig, run_mil_experiment

    bags = BagsConfig(target=a.target, bag_mean=a.bag_mean, bag_std=a.bag_std, train_bags=a.train_bags,
                      test_bags=a.test_bags, positive_rate=a.positive_rate)  # fmt: skip
    train = MILTrainConfig(epochs=a.epochs, num_branches=a.branches, top_k=a.top_k, mask_rate=a.mask_rate,
                           diversity_coef=a.diversity_coef)  # fmt: skip
    methods = tuple(m.strip() for m in a.methods.split(","))
    with locked(a.out):
        table = run_mil_experiment(a.out, tuple(range(a.seeds)), methods, bags, train)
    print(table)
    print(f"\nresults: {Path(a.out) / 'results.md'}, heatmap: {Path(a.out) / 'heatmap.png'}")
    return 0


