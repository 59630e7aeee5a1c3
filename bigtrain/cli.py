"""`bigtrain <verb>`: the command-line interface (also `python -m bigtrain`).

Exit status: 0 success, 2 user error (bad config, missing data, ...), anything else a failure.
User errors print one paragraph saying what to fix, never a traceback.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from bigtrain.errors import EXIT_FAILURE, EXIT_OK, EXIT_USER_ERROR, EnvironmentFailure, UserError


def _cmd_train(args: argparse.Namespace) -> int:
    import os

    from bigtrain import messages
    from bigtrain.sections import apply_overrides, load_yaml

    # Under torchrun every rank runs this: errors found before the trainer starts print once (rank 0).
    messages.set_rank(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))
    from bigtrain.train.loggers import early_wandb_check

    # Fail fast (before torch loads) when W&B is set to online without credentials.
    early_wandb_check(apply_overrides(load_yaml(args.config), args.overrides))

    from bigtrain.checkpoint.manager import CheckpointSaveError
    from bigtrain.config import load_config
    from bigtrain.parallel import dist
    from bigtrain.train.failures import EXIT_NONFINITE, NonFiniteError, report_rank_failure
    from bigtrain.train.signals import StopRequest
    from bigtrain.train.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    try:
        trainer = Trainer(cfg)
        summary = trainer.fit()
    except NonFiniteError as exc:  # every rank raises it (they see the same global values); one prints
        messages.warn(f"bigtrain: error: {exc}")
        return EXIT_NONFINITE
    except CheckpointSaveError as exc:  # each rank says what failed for it (a node's own disk may be full)
        label = messages.rank_label()
        messages.warn(f"bigtrain: error{' on ' + label if label else ''}: {exc}", every_rank=True)
        return EXIT_FAILURE
    except UserError:
        raise  # the same on every rank: main() prints it once
    except Exception as exc:
        report_rank_failure(exc)  # which rank, where; then the traceback
        raise
    finally:
        dist.destroy_process_group()
    if summary.get("stopped_by"):  # SIGUSR1/SIGTERM/SIGINT: checkpoint saved, distinct status (launch/README.md)
        return StopRequest.exit_status(summary["stopped_by"])
    if not trainer.info.is_main:
        return EXIT_OK
    line = f"done: {summary['step']} steps, {summary['tokens']:,} tokens in {summary['train_time_s']:.0f}s"
    if "val_bpb" in summary:
        line += f"; val_loss {summary['val_loss']:.4f}, val_bpb {summary['val_bpb']:.4f}"
    print(line)
    return EXIT_OK


def _cmd_config_check(args: argparse.Namespace) -> int:
    from bigtrain.config import load_config

    if args.world_size < 1:
        raise UserError(f"--world-size must be >= 1, got {args.world_size}.")
    cfg = load_config(args.config, args.overrides)
    seqs, accum = cfg.check_launch(args.world_size)
    print(f"{args.config}: OK for {args.world_size} process{'es' if args.world_size > 1 else ''} "
          f"(parallel.strategy={cfg.parallel.strategy}; {seqs} sequences of {cfg.data.seq_len} per step, "
          f"micro-batch {cfg.train.micro_batch_size}, gradient accumulation {accum})")
    return EXIT_OK


def _cmd_config_show(args: argparse.Namespace) -> int:
    from bigtrain.config import load_config

    print(load_config(args.config, args.overrides).to_yaml(), end="")
    return EXIT_OK


def _cmd_config_docs(args: argparse.Namespace) -> int:
    from bigtrain.config import reference_markdown

    print(reference_markdown(), end="")
    return EXIT_OK


def _cmd_data_demo(args: argparse.Namespace) -> int:
    from bigtrain.data.demo import prepare_demo

    prepare_demo(args.out_dir, vocab_size=args.vocab_size, force=args.force)
    return EXIT_OK


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from bigtrain.data.prepare import prepare_corpus

    prepare_corpus(args.inputs, args.out_dir, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                   val_fraction=args.val_fraction, text_key=args.text_key, seed=args.seed,
                   num_workers=args.num_workers, overwrite=args.overwrite, shard_tokens=args.shard_tokens)
    return EXIT_OK


def _cmd_data_inspect(args: argparse.Namespace) -> int:
    from bigtrain.data.inspect import inspect_path

    inspect_path(args.path, tokenizer=args.tokenizer, sample_tokens=args.sample_tokens, check=args.check)
    return EXIT_OK


def _cmd_data_tokenizer_train(args: argparse.Namespace) -> int:
    from bigtrain.data.tokenizer import train_tokenizer_files

    tok = train_tokenizer_files(args.files, args.vocab_size, args.out, text_key=args.text_key)
    print(f"tokenizer: vocab {tok.vocab_size}, eos {tok.eos_id}, fingerprint {tok.fingerprint} -> {args.out}")
    return EXIT_OK


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from bigtrain.generate import generate, load_for_generation

    _check_generate_args(args)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible on this machine; use --device auto or cpu.")
    model, tokenizer = load_for_generation(args.run_dir, device=device, tokenizer=args.tokenizer)
    for i in range(args.num_samples):
        text = generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_k=args.top_k, device=device, seed=args.seed + i)
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(args.prompt + text)
    return EXIT_OK


def _check_generate_args(args: argparse.Namespace) -> None:
    import math

    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UserError(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}.")
    for flag, value, low in (("--max-new-tokens", args.max_new_tokens, 1), ("--num-samples", args.num_samples, 1),
                             ("--top-k", args.top_k, 0)):
        if value < low:
            raise UserError(f"{flag} must be >= {low}{' (0 = no top-k filter)' if flag == '--top-k' else ''}, "
                            f"got {value}.")


def _cmd_plan(args: argparse.Namespace) -> int:
    from bigtrain.config import load_config
    from bigtrain.plan import STRATEGIES, format_plan

    if args.world_size < 1:
        raise UserError(f"--world-size must be >= 1, got {args.world_size}.")
    if args.gpu_memory_gib <= 0:
        raise UserError(f"--gpu-memory-gib must be positive, got {args.gpu_memory_gib}.")
    from bigtrain.plan_layout import Hardware, format_layouts

    cfg = load_config(args.config, args.overrides)
    strategies = list(STRATEGIES) if args.strategy == "all" else [args.strategy]
    if args.strategy == "single" and args.world_size != 1:
        raise UserError("--strategy single runs one process; use --world-size 1 or another strategy.")
    for flag in ("gpus_per_node", "peak_tflops", "intra_node_gbps", "inter_node_gbps"):
        if getattr(args, flag) <= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}.")
    if not 0 < args.efficiency <= 1:
        raise UserError(f"--efficiency must be in (0, 1], got {args.efficiency}.")
    device = args.device or ("cpu" if cfg.run.device == "cpu" else "cuda")
    hw = Hardware(gpus_per_node=args.gpus_per_node, peak_tflops=args.peak_tflops, efficiency=args.efficiency,
                  intra_node_gbps=args.intra_node_gbps, inter_node_gbps=args.inter_node_gbps,
                  gpu_memory_gib=args.gpu_memory_gib)
    if not cfg.parallel.model_parallel_degrees:  # the data-parallel backends, side by side
        print(format_plan(cfg, args.world_size, strategies, device=device, gpu_memory_gib=args.gpu_memory_gib,
                          source=args.config), end="")
    if args.strategy in ("all", "fsdp") and args.world_size > 1:
        print(("\n" if not cfg.parallel.model_parallel_degrees else "")
              + format_layouts(cfg, args.world_size, hw, device=device), end="")
    return EXIT_OK


def _cmd_plot(args: argparse.Namespace) -> int:
    from bigtrain.plot import plot_runs

    out = plot_runs(args.run_dirs, args.output, smooth=args.smooth)
    print(f"wrote {out}")
    return EXIT_OK


def _cmd_runs(args: argparse.Namespace) -> int:
    from bigtrain.runs import list_runs

    print(list_runs(args.dir, as_json=args.json), end="")
    return EXIT_OK


def _cmd_export(args: argparse.Namespace) -> int:
    from bigtrain.export import export_checkpoint

    export_checkpoint(args.checkpoint, args.to, args.out, overwrite=args.overwrite, tokenizer=args.tokenizer)
    return EXIT_OK


def _cmd_ckpt_ls(args: argparse.Namespace) -> int:
    from bigtrain.checkpoint.inspect import list_checkpoints

    print(list_checkpoints(args.run_dir), end="")
    return EXIT_OK


def _cmd_ckpt_verify(args: argparse.Namespace) -> int:
    from bigtrain.checkpoint.inspect import verify_checkpoints

    report, ok = verify_checkpoints(args.checkpoint)
    print(report, end="")
    return EXIT_OK if ok else 1


def _cmd_doctor(args: argparse.Namespace) -> int:
    from bigtrain.doctor import run_doctor

    if args.probe_seconds <= 0:
        raise UserError(f"--probe-seconds must be positive, got {args.probe_seconds}.")
    return run_doctor(args.config, args.overrides, probe_s=args.probe_seconds)


_TOKENIZER_HELP = ("tokenizer.json to use instead of the checkpoint's own (default: the tokenizer.json saved in the "
                   "checkpoint, else the config's data.tokenizer for older checkpoints); refused unless its "
                   "fingerprint is the one the checkpoint recorded")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bigtrain", description="Pretrain decoder-only Transformers.")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = verbs.add_parser("train", help="train a model from a YAML config")
    p.add_argument("config", help="YAML config, e.g. configs/debug.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-3 model.num_layers=4")
    p.set_defaults(func=_cmd_train)

    p = verbs.add_parser("config", help="inspect configs")
    cfg_verbs = p.add_subparsers(dest="config_verb", metavar="ACTION", required=True)
    q = cfg_verbs.add_parser("show", help="print the resolved config (defaults + file + overrides)")
    q.add_argument("config")
    q.add_argument("overrides", nargs="*")
    q.set_defaults(func=_cmd_config_show)
    q = cfg_verbs.add_parser("check", help="check a config for a launch of N processes (the launch scripts run "
                                           "this before starting ranks)")
    q.add_argument("config")
    q.add_argument("overrides", nargs="*")
    q.add_argument("--world-size", type=int, default=1, help="processes in the launch (default 1)")
    q.set_defaults(func=_cmd_config_check)
    q = cfg_verbs.add_parser("docs", help="print the configuration reference (markdown)")
    q.set_defaults(func=_cmd_config_docs)

    p = verbs.add_parser("data", help="prepare training data")
    data_verbs = p.add_subparsers(dest="data_verb", metavar="ACTION", required=True)
    q = data_verbs.add_parser("demo", help="download the Shakespeare demo corpus, train a tokenizer, write shards")
    q.add_argument("--out-dir", default="data/demo")
    q.add_argument("--vocab-size", type=int, default=4096)
    q.add_argument("--force", action="store_true", help="rebuild even if present")
    q.set_defaults(func=_cmd_data_demo)
    q = data_verbs.add_parser("prepare", help="tokenize local text/jsonl/parquet files into shards")
    q.add_argument("inputs", nargs="+", help="files, directories or globs")
    q.add_argument("--out-dir", required=True)
    q.add_argument("--tokenizer", default=None, help="tokenizer.json to use (default: train a byte-level BPE)")
    q.add_argument("--vocab-size", type=int, default=32000, help="vocabulary of a freshly trained tokenizer")
    q.add_argument("--val-fraction", type=float, default=0.01, help="fraction of documents held out for validation")
    q.add_argument("--text-key", default="text", help="jsonl field / parquet column holding the text")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--num-workers", type=int, default=0, help="tokenizer processes (0 = one per CPU core)")
    q.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty --out-dir")
    q.set_defaults(func=_cmd_data_prepare)
    q = data_verbs.add_parser("inspect", help="token/document counts, per-source stats and a decoded sample")
    q.add_argument("path", help="prepared data directory, shard file/directory/glob, or a YAML run config")
    q.add_argument("--tokenizer", default=None, help="tokenizer.json for decoding ('' = byte-level)")
    q.add_argument("--sample-tokens", type=int, default=64, help="tokens of the decoded sample (0 = none)")
    q.add_argument("--check", action="store_true", help="also scan every token against the tokenizer")
    q.set_defaults(func=_cmd_data_inspect)
    q = data_verbs.add_parser("tokenizer", help="tokenizer tools")
    tok_verbs = q.add_subparsers(dest="tokenizer_verb", metavar="ACTION", required=True)
    r = tok_verbs.add_parser("train", help="train a byte-level BPE tokenizer on text/jsonl/parquet files")
    r.add_argument("files", nargs="+", help="files, directories or globs (jsonl/parquet: field 'text')")
    r.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, EOS included (>= 257)")
    r.add_argument("--out", required=True, help="tokenizer.json to write (or a directory)")
    r.add_argument("--text-key", default="text", help="jsonl field / parquet column holding the text")
    r.set_defaults(func=_cmd_data_tokenizer_train)

    p = verbs.add_parser("generate", help="sample text from a run's latest checkpoint")
    p.add_argument("run_dir", help="run folder (run.out_dir) or checkpoint folder")
    p.add_argument("--prompt", default="")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--tokenizer", default=None, metavar="PATH", help=_TOKENIZER_HELP)
    p.set_defaults(func=_cmd_generate)

    p = verbs.add_parser("export", help="write a checkpoint as a Hugging Face Llama / Qwen3 (model.qk_norm) / "
                                          "Mixtral / Qwen3-MoE (model.moe) folder or one torch state dict")
    p.add_argument("checkpoint", help="checkpoint folder (…/checkpoints/step_N) or run folder (its latest checkpoint)")
    p.add_argument("--to", choices=["hf", "torch"], default="hf",
                   help="hf: config.json + model.safetensors + the checkpoint's tokenizer; torch: one .pt state dict "
                        "(default hf)")
    p.add_argument("out", help="output folder (hf) or file (torch)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (default: refuse)")
    p.add_argument("--tokenizer", default=None, metavar="PATH", help=_TOKENIZER_HELP + "; --to hf only")
    p.set_defaults(func=_cmd_export)

    p = verbs.add_parser("ckpt", help="list and verify checkpoints")
    ckpt_verbs = p.add_subparsers(dest="ckpt_verb", metavar="ACTION", required=True)
    q = ckpt_verbs.add_parser("ls", help="checkpoints of a run folder: step, ranks, size, which one resume picks")
    q.add_argument("run_dir", help="run folder (run.out_dir)")
    q.set_defaults(func=_cmd_ckpt_ls)
    q = ckpt_verbs.add_parser("verify",
                              help="check a checkpoint's files against its manifest (sizes, CRC32); exit 1 if corrupt")
    q.add_argument("checkpoint", help="checkpoint folder, or a run folder to check all of its checkpoints")
    q.set_defaults(func=_cmd_ckpt_verify)

    p = verbs.add_parser("plan",
                         help="per-rank memory of a config for each parallelism backend (nothing is allocated)")
    p.add_argument("config", help="YAML config, e.g. configs/llama3-8b.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.activation_checkpointing=full")
    p.add_argument("--world-size", type=int, required=True, help="number of ranks (GPUs) to plan for")
    p.add_argument("--strategy", default="all", choices=["all", "single", "ddp", "fsdp", "zero1", "zero2", "zero3"],
                   help="one backend, or all (default; single is shown as the 1-rank reference)")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0,
                   help="memory per GPU to check against (default 80)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None,
                   help="what train.precision=auto resolves on: cuda = bf16, cpu = fp32 "
                        "(default: run.device, auto = cuda)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="N-D layouts: GPUs per node (tensor parallelism "
                                                                "stays inside one)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="N-D step-time estimate: peak TFLOP/s per GPU")
    p.add_argument("--efficiency", type=float, default=0.4, help="N-D step-time estimate: achieved fraction of peak")
    p.add_argument("--intra-node-gbps", type=float, default=450.0, help="N-D estimate: GB/s per GPU inside a node")
    p.add_argument("--inter-node-gbps", type=float, default=50.0, help="N-D estimate: GB/s per GPU between nodes")
    p.set_defaults(func=_cmd_plan)

    p = verbs.add_parser("doctor",
                         help="check versions, devices, env, matmul and all-reduce speed, and whether a config fits; "
                              "run it under the training launcher (e.g. torchrun ... -m bigtrain doctor)")
    p.add_argument("config", nargs="?", default=None, help="optional YAML config whose memory plan is checked")
    p.add_argument("overrides", nargs="*", help="dotted overrides for the config")
    p.add_argument("--probe-seconds", type=float, default=1.0, help="duration of the matmul probe (default 1)")
    p.set_defaults(func=_cmd_doctor)

    p = verbs.add_parser("plot",
                         help="plot loss, validation, lr, throughput and grad norm of runs (overlaid) to an image")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders (run.out_dir)")
    p.add_argument("-o", "--output", default="plot.png", help="image to write (.png, .pdf, .svg; default plot.png)")
    p.add_argument("--smooth", type=float, default=0.8, help="EMA weight for loss and grad-norm trend lines (0 = off)")
    p.set_defaults(func=_cmd_plot)

    p = verbs.add_parser("runs", help="table of runs: status, step, tokens, last loss/val bpb, checkpoint, wall time")
    p.add_argument("dir", nargs="?", default="runs",
                   help="folder holding run folders, or one run folder (default runs)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_runs)
    return parser


def _tell_torchrun(exc: UserError) -> None:
    """Under a raw torchrun, whose own ChildFailedError report follows a worker's non-zero exit: put the message in
    torchrun's error file (its report then shows it instead of a pointer to its docs), and say on rank 0 what the
    report is. launch/torchrun.sh checks a config before it starts any rank, so it never gets here for one."""
    import json
    import os
    import time

    from bigtrain import messages

    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not error_file:
        return
    text = f"bigtrain: error: {exc}"
    try:
        with open(error_file, "w") as fh:
            json.dump({"message": {"message": text, "extraInfo": {"py_callstack": text,
                                                                  "timestamp": str(int(time.time()))}}}, fh)
    except OSError:
        pass  # torchrun then reports the exit status alone
    messages.warn("bigtrain: note: torchrun's ChildFailedError report below is about this error (exit status 2 "
                  "on every rank), not a crash; launch/torchrun.sh checks the config before starting ranks.")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse exits with status 2 on bad usage, as a user error should
    try:
        if getattr(args, "overrides", None):
            from bigtrain.sections import check_unique_overrides

            check_unique_overrides(args.overrides)
        code: int = args.func(args)
        return code
    except UserError as exc:
        from bigtrain import messages

        messages.warn(f"bigtrain: error: {exc}")  # once per launch: rank 0 (other ranks found the same)
        _tell_torchrun(exc)
        return EXIT_USER_ERROR
    except EnvironmentFailure as exc:
        from bigtrain import messages

        messages.warn(f"bigtrain: error: {exc}", every_rank=True)  # a node's own disk may be full
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("bigtrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
