"""The ``rlhf`` command: one entry point, one subcommand per stage.

Each training stage takes ``--config FILE.yaml`` plus ``--key value``
overrides for any field of its config dataclass, and calls ``run_<stage>(cfg)``.
User errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import keyword
import os
import sys
import warnings

from rlhf.config import _Parser, add_config_arguments, config_from_namespace
from rlhf.errors import UserError

# name: (config class, run function, one-line help), each as "module:attribute". Config classes live in
# modules that import no heavy library, so building the parser (and `--help`) stays fast; the run
# function's module (torch, transformers, ...) is imported only when the stage runs.
STAGES = {
    "sft": ("rlhf.sft:SFTStageConfig", "rlhf.sft:run_sft",
            "supervised fine-tuning (LoRA, full, freeze, prompt/prefix tuning, LoReFT, bottleneck adapters)"),
    "generate": ("rlhf.generate:GenerateConfig", "rlhf.generate:run_generate",
                 "sample responses for a prompt file into JSONL"),
    "reward": ("reward.train:RewardStageConfig", "reward.train:run_reward", "train a reward model on preference pairs"),
    "ppo": ("rlhf.ppo.config:PPOStageConfig", "rlhf.ppo.stage:run_ppo",
            "optimise the policy adapter against a reward model"),
    "dpo": ("rlhf.dpo:DPOStageConfig", "rlhf.dpo:run_dpo", "DPO of the SFT policy on preference pairs (TRL DPOTrainer)"),
    "export": ("rlhf.export:ExportConfig", "rlhf.export:run_export",
               "export an adapter, a merged model or an interpolation"),
    "eval": ("rlhf.eval_config:EvalConfig", "rlhf.evaluate:run_eval",
             "win rate, reward and KL of a policy against a baseline"),
    "pipeline": ("rlhf.pipeline:PipelineConfig", "rlhf.pipeline:run_pipeline", "all stages end to end from one config"),
}
# extra subcommands nested under a stage: (stage, name) -> (config class, run function, help)
SUBSTAGES = {
    ("reward", "evaluate"): (
        "reward.evaluate:RewardEvalConfig",
        "reward.evaluate:run_reward_evaluate",
        "accuracy and margins of a reward model on a preference file",
    ),
}
HEAVY_MODULES = ("torch", "transformers", "trl", "peft", "gradio", "datasets")  # never imported to build the parser


def _resolve(ref: str):
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def _available(ref: str) -> bool:
    module = ref.partition(":")[0]
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _stage_parser(subparsers, name: str, spec: tuple) -> argparse.ArgumentParser:
    config_ref, run_ref, help_text = spec
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    add_config_arguments(parser, _resolve(config_ref))
    _keyword_options(parser)
    parser.set_defaults(_stage=(config_ref, run_ref))
    return parser


def _keyword_options(parser: argparse.ArgumentParser) -> None:
    """A field named after a Python keyword plus ``_`` (``from_``) is spelled ``--from`` on the command line."""
    for action in list(parser._actions):
        dest = action.dest
        if dest.endswith("_") and keyword.iskeyword(dest[:-1]):
            parser.add_argument(f"--{dest[:-1]}", dest=dest, default=argparse.SUPPRESS, metavar=dest[:-1].upper(),
                                help=action.help)  # fmt: skip
            action.help = argparse.SUPPRESS


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``rlhf`` parser with every subcommand, or with subcommand ``only`` alone (faster to build)."""
    parser = _Parser(prog="rlhf", description="RLHF alignment toolkit: SFT, preference labeling, reward model, PPO, export.")
    subparsers = parser.add_subparsers(dest="command", metavar="STAGE", parser_class=_Parser)
    for name, spec in STAGES.items():
        if _available(spec[0]) and only in (None, name):
            stage = _stage_parser(subparsers, name, spec)
            nested = [f"rlhf {name} {sub}: {s[2]}" for (parent, sub), s in SUBSTAGES.items() if parent == name]
            if nested:
                stage.epilog = "subcommands (see their --help): " + "; ".join(nested)
        if name == "generate" and only in (None, "label") and _available("feedback_ui.commands"):
            from feedback_ui.commands import add_label_parser

            add_label_parser(subparsers)
    return parser


PARALLEL_STAGES = ("sft", "reward", "dpo", "ppo")  # the stages that train data-parallel on N processes


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # PEFT reads transformers' deprecated `is_gradient_checkpointing` on every adapter load: a FutureWarning per
    # stage that no setting of ours can avoid
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    if os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1"):  # one of N launched processes
        command = " ".join(argv[:2] if tuple(argv[:2]) in SUBSTAGES else argv[:1])
        if command not in PARALLEL_STAGES:  # each process would run the whole command and write the same outputs
            if os.environ.get("RANK", "0") == "0":
                print(f"error: `rlhf {command}` runs in one process; only {', '.join(PARALLEL_STAGES)} run on the "
                      "N processes of `accelerate launch` (`rlhf pipeline --num_processes N` launches them itself)",
                      file=sys.stderr)  # fmt: skip
            return 2
        from rlhf.distributed import prepare_environment

        prepare_environment()
    try:
        if len(argv) >= 2 and tuple(argv[:2]) in SUBSTAGES:  # e.g. `rlhf reward evaluate ...`
            spec = SUBSTAGES[tuple(argv[:2])]
            parser = _Parser(prog="rlhf")
            leaf = _stage_parser(parser.add_subparsers(parser_class=_Parser), " ".join(argv[:2]), spec)
            args = leaf.parse_args(argv[2:])
        else:
            known = argv[:1] and (argv[0] in STAGES or argv[0] == "label")
            parser = build_parser(only=argv[0] if known else None)
            args = parser.parse_args(argv)
        if getattr(args, "_stage", None):
            config_ref, run_ref = args._stage
            cfg = config_from_namespace(_resolve(config_ref), args)
            _resolve(run_ref)(cfg)
        elif getattr(args, "func", None):
            args.func(args)
        else:
            parser.print_help()
            return 0 if not argv else 2
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the output went to a reader that stopped (`rlhf label stats --json | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes it
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())
