"""The `raytrain` command: parses arguments into a Config and calls a stage; no logic of its own."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import sys
from collections.abc import Callable

from raytrain.config import Config, load_config, presets
from raytrain.errors import find_raytrain_error
from raytrain.reference import config_meanings

# (flag, config key, argparse options) per command; flags are sugar for `key=value` overrides.
SOURCE_FLAGS = [
    ("--input", "data.source.inputs", {"nargs": "+", "metavar": "SRC",
                                       "help": "files, folders, globs, s3:// or gs:// URIs, or 'stdlib'"}),
    ("--text-field", "data.source.text_field", {"help": "JSONL field / Parquet column with the text"}),
    ("--skip-bad-records", "data.source.skip_bad_records",
     {"action": "store_const", "const": True, "help": "skip and count malformed JSONL lines"}),
    ("--other-files-as-text", "data.source.other_files_as_text",
     {"action": "store_const", "const": True,
      "help": "read files of other suffixes found in folders (LICENSE, .rst) as text instead of skipping them"}),
]
TOKENIZER_FLAGS = [
    *SOURCE_FLAGS,
    ("--vocab-size", "data.tokenizer.vocab_size", {"type": int}),
    ("--out", "data.tokenizer.out", {"metavar": "DIR"}),
    ("--overwrite", "data.tokenizer.overwrite", {"action": "store_const", "const": True}),
]
ROW_FLAGS = [  # token rows and their output folder, for every `raytrain data` command that writes them
    ("--tokenizer", "data.prepare.tokenizer", {"metavar": "DIR"}),
    ("--seq-len", "data.prepare.seq_len", {"type": int}),
    ("--out", "data.prepare.out", {"metavar": "DIR"}),
    ("--val-fraction", "data.prepare.val_fraction", {"type": float}),
    ("--seed", "data.prepare.seed", {"type": int}),
    ("--overwrite", "data.prepare.overwrite", {"action": "store_const", "const": True}),
]
PREPARE_FLAGS = [*SOURCE_FLAGS, *ROW_FLAGS]
SFT_DATA_FLAGS = [
    ("--input", "data.source.inputs", {"nargs": "+", "metavar": "SRC",
                                       "help": "JSONL/Parquet records, folders, globs, URIs, or 'stdlib-qa'"}),
    *ROW_FLAGS,
    ("--prompt-field", "data.chat.prompt_field", {"help": "record field with the prompt (default: prompt)"}),
    ("--response-field", "data.chat.response_field", {"help": "record field with the response (default: response)"}),
    ("--messages-field", "data.chat.messages_field", {"help": "record field with [{role, content}] turns"}),
]
PREFS_DATA_FLAGS = [
    ("--input", "data.source.inputs", {"nargs": "+", "metavar": "SRC",
                                       "help": "JSONL/Parquet records, folders, globs, URIs, or 'stdlib-prefs'"}),
    *ROW_FLAGS,
    ("--prompt-field", "data.chat.prompt_field", {"help": "record field with the prompt (default: prompt)"}),
    ("--chosen-field", "data.chat.chosen_field", {"help": "the preferred response (default: chosen)"}),
    ("--rejected-field", "data.chat.rejected_field", {"help": "the other response (default: rejected)"}),
    ("--responses-field", "data.chat.responses_field", {"help": "a list of responses (default: responses)"}),
    ("--ranking-field", "data.chat.ranking_field", {"help": "their indices, best first (default: ranking)"}),
]
KTO_DATA_FLAGS = [
    ("--input", "data.source.inputs", {"nargs": "+", "metavar": "SRC",
                                       "help": "JSONL/Parquet records, folders, globs, URIs, or 'stdlib-kto'"}),
    *ROW_FLAGS,
    ("--prompt-field", "data.chat.prompt_field", {"help": "record field with the prompt (default: prompt)"}),
    ("--completion-field", "data.chat.completion_field", {"help": "the completion (default: completion)"}),
    ("--label-field", "data.chat.label_field", {"help": "true: desirable, false: undesirable (default: label)"}),
    ("--messages-field", "data.chat.messages_field", {"help": "record field with [{role, content}] turns"}),
]
# A config override: `section.key=value` with a section of Config (run, data, train, ...).
OVERRIDE = re.compile(rf"^({'|'.join(f.name for f in dataclasses.fields(Config))})(\.\w+)+=")
DEMO_FLAGS = [("--out", "run.root", {"metavar": "DIR", "help": "where the demo writes (runs/)"}),
              ("--task", "run.task", {"metavar": "NAME", "help": "the chain on a verifiable task instead (arith, sort: "
                                                          "raytrain/tasks/), measured by held-out accuracy"})]


def _add_command(subparsers, name: str, help_text: str, flags: list, stage: Callable[[Config], object],
                 default_config: str | None = None) -> None:
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    parser.add_argument("--config", default=default_config,
                        help=f"preset ({', '.join(presets())}) or YAML file")
    parser.add_argument("--address", help="Ray address (default: $RAY_ADDRESS, else local Ray)")
    meanings = config_meanings()
    for flag, key, options in flags:  # a flag without its own help says what its config key does
        parser.add_argument(flag, **{"help": meanings[key].replace("%", "%%"), **options})
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    parser.set_defaults(stage=stage, flags=flags)


def build_parser() -> argparse.ArgumentParser:
    from raytrain.data.chat_data import run_kto_data_stage, run_prefs_data_stage, run_sft_data_stage
    from raytrain.data.prepare import run_prepare_stage
    from raytrain.data.tokenizer_stage import run_tokenizer_stage
    from raytrain.demo import run_demo
    from raytrain.stages import STAGES

    parser = argparse.ArgumentParser(prog="raytrain", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="tokenizer training and dataset preparation")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    _add_command(data_commands, "tokenizer", "train a byte-level BPE tokenizer",
                 TOKENIZER_FLAGS, run_tokenizer_stage)
    _add_command(data_commands, "prepare", "tokenize, pack and shard a corpus with Ray Data",
                 PREPARE_FLAGS, run_prepare_stage)
    _add_command(data_commands, "sft", "conversations → token rows with an answer loss mask (Ray Data)",
                 SFT_DATA_FLAGS, run_sft_data_stage)
    _add_command(data_commands, "prefs", "ranked responses → token rows for a reward model (Ray Data)",
                 PREFS_DATA_FLAGS, run_prefs_data_stage)
    _add_command(data_commands, "kto", "completions labelled desirable or not → token rows for KTO (Ray Data)",
                 KTO_DATA_FLAGS, run_kto_data_stage)
    for stage in STAGES.values():
        _add_command(commands, stage.name, stage.help, stage.cli_flags(), stage.run, default_config="demo")
    _add_tune_command(commands)
    _add_model_commands(commands)
    _add_report_commands(commands)
    _add_submit_command(commands)
    _add_command(commands, "demo", "run the whole chain on the stdlib corpus with a tiny model",
                 DEMO_FLAGS, run_demo, default_config="demo")
    config = commands.add_parser("config", help="print the resolved config")
    config.add_argument("--config", help=f"preset ({', '.join(presets())}) or YAML file (default: the code's "
                                         "defaults)")
    config.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    config.set_defaults(stage=lambda c: print(c.to_yaml(), end=""), flags=[])
    _name_leaf_parsers(parser)
    return parser


def _name_leaf_parsers(parser: argparse.ArgumentParser) -> None:
    """Each command's parser records itself, so `parse_args` can hand it the command's arguments; a command
    given only a one-line help shows it as its --help description too."""
    subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for action in subcommands:
        helps = {choice.dest: choice.help for choice in action._choices_actions}
        for name, child in action.choices.items():
            child.description = child.description or helps.get(name)
            _name_leaf_parsers(child)
    if not subcommands:
        parser.set_defaults(parser=parser)


def _add_tune_command(commands) -> None:
    from raytrain.stages import STAGES
    from raytrain.tune.sweep import tune_command

    tune = commands.add_parser("tune", help="sweep a stage's hyperparameters with Ray Tune (ASHA stops bad trials "
                                            "early)")
    tune.add_argument("--stage", required=True, choices=STAGES, help="the stage every trial runs")
    tune.add_argument("--config", default="demo", help=f"preset ({', '.join(presets())}) or YAML file")
    tune.add_argument("--space", required=True, metavar="SPACE.yaml",
                      help="config keys → {loguniform|uniform|randint: [lo, hi]} or {choice|grid: [...]}")
    tune.add_argument("--samples", type=int, default=4, help="trials drawn (× each grid value)")
    tune.add_argument("--scheduler", choices=["asha", "none"], default="asha")
    tune.add_argument("--metric", help="what to optimise (default: the stage's held-out metric, e.g. val/loss)")
    tune.add_argument("--mode", choices=["min", "max"])
    tune.add_argument("--name", required=True, help="sweep name: runs/NAME/; rerunning a name resumes it")
    tune.add_argument("--max-concurrent", type=int, help="at most this many trials at once (default: as many as "
                                                         "the cluster's free resources fit)")
    tune.add_argument("--address", help="Ray address (default: $RAY_ADDRESS, else local Ray)")
    tune.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides for every trial")
    tune.set_defaults(action=tune_command)


def _add_report_commands(commands) -> None:
    """`raytrain report` (plots without W&B) and `raytrain dashboards` (W&B workspaces as code)."""
    from dashboards import commands as dashboard_commands

    report = commands.add_parser("report", help="plots and an HTML page from run and sweep folders (no W&B)")
    report.add_argument("paths", nargs="+", metavar="RUN_OR_SWEEP",
                        help="run folders (runs/NAME) and sweep folders (raytrain tune)")
    report.add_argument("--out", required=True, metavar="DIR",
                        help="report folder (index.html and PNGs); an older report there is replaced")
    report.set_defaults(action=_report)

    dashboards = commands.add_parser("dashboards", help="W&B workspaces of the stages and sweeps: JSON specs or "
                                                        "saved views")
    actions = dashboards.add_subparsers(dest="dashboards_command", required=True)
    sweeps = {"nargs": "+", "metavar": "RUNS/SWEEP", "help": "sweep folders written by `raytrain tune`: one "
                                                             "workspace each"}
    export = actions.add_parser("export", help="write the workspaces as JSON specs, offline (no key needed)")
    export.add_argument("--out", required=True, metavar="DIR", help="folder for the <workspace>.json files")
    export.add_argument("--entity", default="", help="W&B user or team (may stay empty offline)")
    export.add_argument("--project", default="raytrain", help="W&B project (default: raytrain, as tracking.project)")
    export.add_argument("--sweep", **sweeps)
    export.set_defaults(action=dashboard_commands.export)
    publish = actions.add_parser("publish", help="save the workspaces to W&B as new views; prints their URLs")
    publish.add_argument("--entity", required=True, help="W&B user or team that owns the project")
    publish.add_argument("--project", default="raytrain", help="W&B project (default: raytrain, as tracking.project)")
    publish.add_argument("--sweep", **sweeps)
    publish.set_defaults(action=dashboard_commands.publish)


def _report(args) -> None:
    from raytrain.report import report_command  # matplotlib loads only for this command

    report_command(args)


def _add_model_commands(commands) -> None:
    from raytrain import commands as handlers

    plan = commands.add_parser("plan", help="dry-run a parallel layout: memory per rank, fit, step time")
    plan.add_argument("--config", required=True, help="preset (llama-1b, llama-8b, llama-70b, …) or YAML file")
    plan.add_argument("--world", type=int, required=True, help="number of ranks (GPUs)")
    plan.add_argument("--seq-len", type=int, help="tokens per training row (default: model.max_seq_len)")
    plan.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per device (default 80)")
    plan.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 TFLOP/s per device (H100: 989)")
    plan.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation for the estimate")
    plan.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides (the layout: "
                                                                           "parallel.tp=8 …)")
    plan.set_defaults(action=handlers.plan)

    evaluate = commands.add_parser("eval", help="validation loss and perplexity of a checkpoint; pairwise "
                                                "accuracy of a reward model; exact-match accuracy on a task")
    _model_source(evaluate, "checkpoint or run folder")
    what = evaluate.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", help="prepared dataset folder")
    what.add_argument("--task", metavar="NAME[:LEVELS]", help="a verifiable task (arith, sort; raytrain/tasks/): "
                                                              "accuracy on its held-out problems, by level")
    evaluate.add_argument("--samples", type=int, default=0, help="with --task: sampled replies per problem for "
                                                                 "pass@1 and pass@K (default 0: greedy only)")
    evaluate.add_argument("--temperature", type=float, default=1.0, help="with --task: sampling temperature")
    evaluate.add_argument("--problems", type=int, default=0, help="with --task: the first N held-out problems "
                                                                  "(default 0: all)")
    evaluate.add_argument("--seed", type=int, default=0, help="with --task: sampling seed")
    evaluate.add_argument("--tokenizer", help="tokenizer folder (default: the one the data used)")
    evaluate.add_argument("--batches", type=int, default=8, help="val batches to read (0: the whole split once)")
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.set_defaults(action=handlers.evaluate)

    generate = commands.add_parser("generate", help="sample text from a checkpoint (or an ONNX export)")
    _model_source(generate, "checkpoint or run folder")
    generate.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    generate.add_argument("--tokenizer", help="tokenizer folder (default: the one the data used)")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.8)
    generate.add_argument("--top-k", type=int, default=50)
    generate.add_argument("--top-p", type=float, default=0.95)
    generate.add_argument("--seed", type=int, default=0, help="sampling seed; prompt i samples with seed + i")
    generate.add_argument("--chat", action="store_true", help="prompts are user turns; answer as the assistant")
    generate.add_argument("--system", help="with --chat: a system turn before each prompt")
    generate.set_defaults(action=handlers.generate)

    score = commands.add_parser("score", help="a reward model's score of responses to a prompt")
    _model_source(score, "reward checkpoint or run folder")
    score.add_argument("--prompt", required=True, help="the user turn")
    score.add_argument("--response", action="append", required=True, help="an assistant reply; repeat to compare")
    score.add_argument("--system", help="a system turn before the prompt")
    score.add_argument("--tokenizer", help="tokenizer folder (default: the one the data used)")
    score.set_defaults(action=handlers.score)

    convert = commands.add_parser("convert",
                                  help="Hugging Face checkpoints (Llama 3.x, Qwen2.5, Qwen3, Mistral) in and out")
    directions = convert.add_subparsers(dest="direction", required=True)
    to_hf = directions.add_parser("to-hf", help="raytrain checkpoint → safetensors + config.json of its family "
                                                "({Family}ForCausalLM; {Family}ForSequenceClassification for a "
                                                "reward model) and its tokenizer; a LoRA run's: a PEFT "
                                                "adapter folder")
    to_hf.add_argument("checkpoint")
    to_hf.add_argument("--out", required=True)
    to_hf.add_argument("--merge", action="store_true", help="a LoRA run's adapters folded into full weights, "
                                                            "not a PEFT adapter folder")
    to_hf.set_defaults(action=handlers.convert_to_hf)
    from_hf = directions.add_parser("from-hf", help="Hugging Face model folder → raytrain checkpoint, its tokenizer "
                                                    "and a starting config.yaml")
    from_hf.add_argument("hf_dir")
    from_hf.add_argument("--out", required=True)
    from_hf.set_defaults(action=handlers.convert_from_hf)

    export = commands.add_parser("export", help="deployable models")
    formats = export.add_subparsers(dest="format", required=True)
    onnx = formats.add_parser("onnx", help="checkpoint → ONNX graphs with a KV cache for onnxruntime (fp32, int8 "
                                           "or int4), tokenizer included; prints what quantization cost")
    onnx.add_argument("checkpoint", metavar="CKPT|RUN", help="checkpoint or run folder (its latest checkpoint)")
    onnx.add_argument("--out", required=True, metavar="DIR", help="the export folder (appears only when complete)")
    onnx.add_argument("--quantize", default="none", metavar="none|int8|int4",
                      help="int8: dynamic int8 weights and activations; int4: 4-bit weights (default: none, fp32)")
    onnx.add_argument("--data", metavar="DIR", help="prepared dataset to measure held-out perplexity (accuracy for "
                                                    "a reward model) on; default: the checkpoint's own, if prepared")
    onnx.add_argument("--batches", type=int, default=8, help="val batches to measure on (0: the whole split)")
    onnx.add_argument("--batch-size", type=int, default=16)
    onnx.add_argument("--tokenizer", help="tokenizer folder (default: the one the data used)")
    onnx.add_argument("--overwrite", action="store_true", help="replace an earlier export in DIR")
    onnx.set_defaults(action=_export_onnx)


def _add_submit_command(commands) -> None:
    submit = commands.add_parser("submit", help="submit a job spec (jobs/*.yaml) to a Ray cluster, stream its "
                                                "logs, exit with its status (0 succeeded, 1 failed, 3 stopped)")
    submit.add_argument("spec", metavar="jobs/X.yaml", help="job spec: entrypoint, runtime_env, resources, metadata")
    submit.add_argument("--address", help="the cluster's job server (dashboard) URL (default: "
                                          "$RAY_API_SERVER_ADDRESS or an http $RAY_ADDRESS, else "
                                          "http://127.0.0.1:8265)")
    submit.add_argument("--no-wait", action="store_true", help="print the job id and how to follow it, and return")
    submit.add_argument("overrides", nargs="*", metavar="key.sub=value", help="appended to the entrypoint")
    submit.set_defaults(action=_submit)


def _submit(args) -> int:
    from raytrain.cluster.submit import submit_command  # the job client loads only for this command

    return submit_command(args)


def _model_source(parser: argparse.ArgumentParser, what: str) -> None:
    """--checkpoint (torch) or --onnx (an export on onnxruntime), one of them."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help=what)
    source.add_argument("--onnx", metavar="DIR", help="an ONNX export folder (raytrain export onnx), on onnxruntime")


def _export_onnx(args) -> None:
    from raytrain.export.commands import export_command  # the ONNX exporter loads only for this command

    export_command(args)


def _overrides(args: argparse.Namespace) -> list[str]:
    items = []
    for flag, key, _ in args.flags:
        value = getattr(args, _dest(flag))
        if value is None:
            continue
        if isinstance(value, list):
            value = "[" + ", ".join(_quote(v) for v in value) + "]"
        elif isinstance(value, str):
            value = _quote(value)
        items.append(f"{key}={value}")
    if getattr(args, "address", None):
        items.append(f"runtime.address={_quote(args.address)}")
    return items + args.overrides


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _quote(value: str) -> str:
    # Keep paths and URIs strings when the override value is parsed as YAML.
    return "'" + value.replace("'", "''") + "'"


def parse_args(argv: list[str]) -> argparse.Namespace:
    """`key=value` overrides may stand anywhere among a command's flags (argparse's intermixed parsing)."""
    parser = build_parser()
    command = parser.parse_known_args(argv)[0].parser  # which (sub)command; its own parser reads the rest
    depth = len(command.prog.split()) - 1  # `raytrain data prepare` → 2 command words
    args = command.parse_intermixed_args(argv[depth:])
    for flag, _, options in getattr(args, "flags", []):
        if options.get("nargs") == "+":  # `--input a b key=value`: the override is not an input
            name = _dest(flag)
            values = getattr(args, name) or []
            setattr(args, name, [v for v in values if not OVERRIDE.match(v)] or None)
            args.overrides += [v for v in values if OVERRIDE.match(v)]
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if hasattr(args, "action"):
            status = args.action(args)
            if type(status) is int:  # the command's own exit status (raytrain submit: the job's)
                return status
        else:
            args.stage(load_config(args.config, _overrides(args)))
    except KeyboardInterrupt:
        print("raytrain: interrupted; no partial output was left in place", file=sys.stderr)
        return 130
    except Exception as exc:
        error = find_raytrain_error(exc)
        if error is None:
            raise
        print(f"raytrain: error: {error}", file=sys.stderr)
        return 2
    return 0
