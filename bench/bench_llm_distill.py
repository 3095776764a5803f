"""Recovery of a depth-pruned SmolLM2-135M by token-level distillation from the unpruned model.

Three phases, each its own process so that a long recovery can be split into pieces that each fit a
bounded slot of machine time (the state folder carries the student, the optimizer and the schedule
from one piece to the next; a resumed piece continues exactly where the last stopped):

    bench_llm_distill.py prune --state DIR     # dense + pruned perplexity, the 22-block student saved
    bench_llm_distill.py train --state DIR --steps 40    # 40 more optimizer steps (repeat as needed)
    bench_llm_distill.py eval  --state DIR     # recovered perplexity, decode tokens/s of all three

- Model: ``{hf: smollm2}`` (SmolLM2-135M-Instruct, 30 blocks). Pruning: ``DepthConfig(blocks=8,
  importance="angular")`` (ShortGPT block influence) on ``--calib`` windows of the first 80% of
  WikiText-2 validation, as the ``smollm2_prune_distill`` recipe's prune step.
- Recovery: ``DistillationCallback`` with ``output_loss="token_kd"`` (KL(teacher || student) per token
  at ``--temperature``, chunked, teacher live under no_grad), AdamW, cosine schedule over
  ``--total-steps`` with warm-up, ``--batch`` windows of ``--seq-len`` tokens from the first 80% of
  WikiText-2 validation and the train part (first 85%) of Tiny Shakespeare, shuffled.
- Perplexity: ``--eval-windows`` windows of ``--eval-seq-len`` tokens from the start of the held-out
  last 20% of WikiText-2 validation (never trained or calibrated on). Decode: greedy with the KV cache,
  128-token prompts, 64 new tokens, batch 1 and 8, models timed interleaved, ``--threads`` threads.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from benchlib import log, uptime


def read_state(state: Path, name: str) -> dict:
    """A JSON file of the state folder, ``{}`` while its phase has not run."""
    file = state / name
    return json.loads(file.read_text()) if file.is_file() else {}


def _save(state: Path, name: str, info: dict) -> None:
    (state / name).write_text(json.dumps(info, indent=2))


def dense_model():
    from slimkit.models.causal_lm import load_causal_lm

    model, tokenizer = load_causal_lm("smollm2")
    return model.eval(), tokenizer


def held_out(args, tokenizer):
    from slimkit.data.lm import TokenWindows, load_wikitext2, token_windows

    bundle = load_wikitext2(args.data / "wikitext2", val_fraction=0.0, seq_len=args.eval_seq_len)
    test = token_windows(bundle.test, tokenizer, args.eval_seq_len)
    n = args.eval_windows * args.eval_seq_len
    return TokenWindows(test.ids[:n], args.eval_seq_len, source=test.source), bundle


def train_windows(args, tokenizer):
    """First 80% of WikiText-2 validation + Tiny Shakespeare's train part, in --seq-len windows."""
    from torch.utils.data import ConcatDataset

    from slimkit.data.lm import load_tinyshakespeare, load_wikitext2, token_windows

    wiki = load_wikitext2(args.data / "wikitext2", val_fraction=0.0, seq_len=args.seq_len)
    shakespeare = load_tinyshakespeare(args.data / "tinyshakespeare", val_fraction=0.05, seq_len=args.seq_len)
    parts = [token_windows(b.train, tokenizer, args.seq_len, split="train") for b in (wiki, shakespeare)]
    return ConcatDataset(parts), [len(p) for p in parts]


def perplexity(model, test) -> float:
    from slimkit.metrics.lm import evaluate_perplexity

    return evaluate_perplexity(model, test)["perplexity"]


def calibration(args, tokenizer, bundle) -> list[dict]:
    """``--calib`` windows of ``--eval-seq-len`` tokens spread over the first 80% (never the test part)."""
    from slimkit.data.lm import token_windows

    windows = token_windows(bundle.train, tokenizer, args.eval_seq_len, split="train")
    picks = torch.linspace(0, len(windows) - 1, args.calib).round().long().tolist()
    return [{"input_ids": windows[i]["input_ids"][None]} for i in picks]


def prune_config(args):
    """Depth: ``--drop`` blocks by ``--importance``. Width: ``--ffn-ratio`` of every SwiGLU FFN's neurons
    and ``--kv-ratio`` of every attention's key/value groups (with their query heads), by ``output``
    energy (activation x weight) on the calibration windows."""
    from slimkit.prune import DepthConfig, StructuredConfig

    if args.mode == "depth":
        return DepthConfig(blocks=args.drop, importance=args.importance, calibration_batches=args.calib)
    return StructuredConfig(
        ratio=args.ffn_ratio,
        head_ratio=args.kv_ratio,
        gqa="groups",
        importance="output",
        calibration_batches=args.calib,
    )


def phase_prune(args) -> None:
    from slimkit.prune import prune_
    from slimkit.tasks import text_forward

    model, tokenizer = dense_model()
    test, bundle = held_out(args, tokenizer)
    t0 = time.perf_counter()
    dense = perplexity(model, test)
    log(f"dense: ppl {dense:.3f} ({time.perf_counter() - t0:.0f} s)")
    calib = calibration(args, tokenizer, bundle)
    t0 = time.perf_counter()
    summary = prune_(model, prune_config(args), calibration=calib, forward=text_forward)
    prune_s = time.perf_counter() - t0
    pruned = perplexity(model, test)
    log(f"pruned ({args.mode}, {prune_s:.0f} s): ppl {pruned:.3f}, {summary.params_after} parameters")
    model.save_pretrained(args.state / "student")
    tokenizer.save_pretrained(args.state / "student")
    info = {
        "mode": args.mode,
        "dense_ppl": dense,
        "pruned_ppl": pruned,
        "prune_s": prune_s,
        "params_dense": summary.params_before,
        "params_pruned": summary.params_after,
        "uptime": uptime(),
    }
    if args.mode == "depth":
        info.update(dropped=summary.details["dropped"], importance=args.importance)
    else:
        cfg = model.config
        info.update(
            intermediate_size=cfg.intermediate_size,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_key_value_heads,
        )
    _save(args.state, "prune.json", info)


def phase_train(args) -> None:
    import transformers

    from slimkit.distill import DistillationCallback, DistillConfig
    from slimkit.tasks import lm_loss, text_forward
    from slimkit.train import Callback, TrainConfig, Trainer

    teacher, tokenizer = dense_model()
    student = transformers.AutoModelForCausalLM.from_pretrained(args.state / "student")
    data, sizes = train_windows(args, tokenizer)
    if args.total_steps * args.batch < len(data):  # a shorter recovery: a fixed random subset, one epoch
        from torch.utils.data import Subset

        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
        data = Subset(data, order[: args.total_steps * args.batch].tolist())
    per_epoch = math.ceil(len(data) / args.batch)
    done = read_state(args.state, "train.json").get("steps", 0)
    cfg = TrainConfig(
        epochs=max(1, math.ceil(args.total_steps / per_epoch)),
        batch_size=args.batch,
        lr=args.lr,
        optimizer="adamw",
        schedule="cosine",
        warmup_steps=args.warmup,
        min_lr_ratio=0.1,
        grad_clip=1.0,
        max_steps=done + args.steps,
        progress=False,
    )
    ckpt = args.state / "ckpt"
    forward = text_forward
    if args.autocast:
        from slimkit.recipes.steps.distill import bf16_forward

        forward = bf16_forward(text_forward)
    kd = DistillationCallback(
        teacher,
        DistillConfig(output_loss="token_kd", temperature=args.temperature, alpha=args.alpha),
        forward=forward,
    )

    start = time.perf_counter()

    class Every(Callback):
        def on_step_end(self, trainer):
            if trainer.global_step % 5 == 0:
                log(f"step {trainer.global_step}: {kd.terms}")
            if args.minutes and time.perf_counter() - start > 60 * args.minutes:
                trainer.config.max_steps = trainer.global_step  # this piece's time is up (not saved state)

    trainer = Trainer(
        student, cfg, callbacks=[kd, Every()], forward=forward, loss_fn=lm_loss, task="language_modeling"
    )
    t0 = time.perf_counter()
    trainer.fit(data, resume_from=ckpt if ckpt.is_dir() else None)
    wall = time.perf_counter() - t0
    trainer.save_checkpoint(ckpt)
    student.save_pretrained(args.state / "student")
    steps = trainer.global_step - done
    rate = steps * args.batch * args.seq_len / wall
    log(f"{steps} steps in {wall:.0f} s: {rate:.1f} train tokens/s ({wall / max(steps, 1):.1f} s/step)")
    history = read_state(args.state, "train.json")
    pieces = history.get("pieces", []) + [
        {"steps": steps, "wall_s": wall, "tokens_per_s": rate, "last_terms": kd.terms, "uptime": uptime()}
    ]
    _save(
        args.state,
        "train.json",
        {
            "steps": trainer.global_step,
            "windows": sizes,
            "per_epoch": per_epoch,
            "schedule_steps": per_epoch * cfg.epochs,
            "pieces": pieces,
            "seq_len": args.seq_len,
            "batch": args.batch,
            "lr": args.lr,
            "threads": torch.get_num_threads(),
        },
    )


def phase_eval(args) -> None:
    import transformers
    from bench_llm import measure_generation

    from slimkit.recipes.lm_measure import prompt_rows

    dense, tokenizer = dense_model()
    test, _ = held_out(args, tokenizer)
    student = transformers.AutoModelForCausalLM.from_pretrained(args.state / "student").eval()
    recovered = perplexity(student, test)
    info = {**read_state(args.state, "prune.json"), "recovered_ppl": recovered}
    info["steps"] = read_state(args.state, "train.json").get("steps", 0)
    log(f"recovered after {info['steps']} steps: ppl {recovered:.3f} (dense {info.get('dense_ppl')})")
    if args.decode:
        prompts = prompt_rows(test.ids, 8, args.prompt_tokens)
        info["decode"] = measure_generation({"dense": dense, "student": student}, prompts, args)
    info["uptime"] = uptime()
    _save(args.state, "eval.json", info)
    print(json.dumps(info, indent=2))


def phase_quant(args) -> None:
    """The (recovered) student quantized as bench_llm's ``--quant-row`` (default GPTQ int4 g64 with an
    int8 lm_head) on the calibration windows; its perplexity and file size; decode speed of the dense
    model, the student and the quantized student, eager and compiled (static cache), interleaved."""
    import tempfile

    import transformers
    from bench_llm import build_row, compiled_entries, file_bytes, measure_generation

    from slimkit.recipes.lm_measure import prompt_rows

    dense, tokenizer = dense_model()
    test, bundle = held_out(args, tokenizer)
    student = transformers.AutoModelForCausalLM.from_pretrained(args.state / "student").eval()
    quantized, info = build_row(args.quant_row, student, calibration(args, tokenizer, bundle))
    info = {k: v for k, v in info.items() if isinstance(v, (int, float, str))}
    info["perplexity"] = perplexity(quantized, test)
    with tempfile.TemporaryDirectory() as tmp:
        info["file_bytes"], info["file_format"] = file_bytes(args.quant_row, quantized, Path(tmp))
    log(f"{args.quant_row}: ppl {info['perplexity']:.3f}, {info['file_bytes'] / 1e6:.1f} MB")
    models = {"dense": dense, "student": student, "quantized": quantized}
    prompts = prompt_rows(test.ids, 8, args.prompt_tokens)
    args.compile = ["dense", "student", "quantized"] if args.compile_decode else []
    compiled, notes = compiled_entries(models, prompts, args)
    speeds = measure_generation({**models, **compiled}, prompts, args)
    info.update(decode=speeds, compile_notes=notes, quant_row=args.quant_row, uptime=uptime())
    info["steps"] = read_state(args.state, "train.json").get("steps", 0)
    _save(args.state, "quant.json", info)
    print(json.dumps(info, indent=2, default=str))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=("prune", "train", "eval", "quant"))
    p.add_argument("--state", type=Path, required=True, help="folder carried from phase to phase")
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--drop", type=int, default=8, help="blocks to drop (of 30)")
    p.add_argument("--calib", type=int, default=32, help="calibration windows for the block scores")
    p.add_argument("--importance", choices=("angular", "perplexity"), default="angular", help="block ranking")
    p.add_argument("--mode", choices=("depth", "width"), default="depth", help="prune: what to remove")
    p.add_argument("--ffn-ratio", type=float, default=0.25, help="width: share of FFN neurons removed")
    p.add_argument("--kv-ratio", type=float, default=1 / 3, help="width: share of key/value groups removed")
    p.add_argument("--steps", type=int, default=1000, help="train: optimizer steps in this piece")
    p.add_argument("--minutes", type=float, default=0, help="train: stop this piece after so many minutes")
    p.add_argument("--total-steps", type=int, default=600, help="the cosine schedule's length")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--autocast", action="store_true", help="train: forward passes under bf16 autocast")
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--decode", action="store_true", help="eval: also time decoding (dense vs student)")
    p.add_argument("--quant-row", default="gptq_g64_head8", help="quant: a bench_llm.py row key")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--compile-decode",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="quant: also decode every model through a static cache and a torch.compile'd step",
    )
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    args.state.mkdir(parents=True, exist_ok=True)
    log(f"{args.phase}: {uptime()}, {args.threads} threads")
    {"prune": phase_prune, "train": phase_train, "eval": phase_eval, "quant": phase_quant}[args.phase](args)


if __name__ == "__main__":
    main()
