"""EngineArgs and FlexibleArgumentParser: the flags of a vLLM offline script reach Config unchanged."""

import argparse
import dataclasses

import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.config import Config, make_config
from nanovllm.engine.arg_utils import DEFAULT_MODEL, EngineArgs
from nanovllm.utils import FlexibleArgumentParser


def engine_parser() -> FlexibleArgumentParser:
    parser = FlexibleArgumentParser(prog="generate")
    assert EngineArgs.add_cli_args(parser) is parser
    return parser


def test_fields_match_config():
    config_fields = {f.name: f for f in dataclasses.fields(Config) if f.init}
    args_fields = {f.name: f for f in dataclasses.fields(EngineArgs)}
    assert list(args_fields) == list(config_fields) == Config.field_names()
    for name, f in config_fields.items():
        assert args_fields[name].type == f.type, name
        if name != "model":
            assert args_fields[name].default == f.default, name
    assert EngineArgs().model == DEFAULT_MODEL


def test_every_config_field_has_a_flag_with_help():
    parser = engine_parser()
    by_dest = {a.dest: a for a in parser._actions}
    for name in Config.field_names():
        action = by_dest[name]
        assert "--" + name.replace("_", "-") in action.option_strings
        assert action.help
    defaults = vars(parser.parse_args([]))
    assert defaults == EngineArgs().to_kwargs()


def test_flags_dashed_and_underscored_reach_config(qwen3_tied):
    parser = engine_parser()
    parser.set_defaults(model=qwen3_tied)
    args = parser.parse_args(
        [
            "--max_num_seqs", "4",
            "--max-model-len=128",
            "--kvcache_block_size=16",
            "--num-kvcache-blocks", "8",
            "--gpu_memory_utilization", "0.5",
            "--enforce-eager",
            "--no-enable-prefix-caching",
            "--dtype", "half",
            "--seed=0",
            "--device", "cpu",
            "--load_format", "dummy",
            "--no_overlap_scheduling",
        ]
    )  # fmt: skip
    engine_args = EngineArgs.from_cli_args(args)
    assert engine_args.max_num_seqs == 4 and engine_args.max_model_len == 128
    assert engine_args.enforce_eager is True and engine_args.enable_prefix_caching is False
    assert engine_args.overlap_scheduling is False and engine_args.torch_compile is None
    config = Config(**engine_args.to_kwargs())
    assert config.model == qwen3_tied and config.kvcache_block_size == 16 and config.num_kvcache_blocks == 8
    assert config.gpu_memory_utilization == 0.5 and config.dtype == "float16" and config.seed == 0
    assert config.load_format == "dummy" and config.device == "cpu"


def test_vllm_generate_script_pattern(qwen3_tied):
    # vLLM's examples/offline_inference/basic/generate.py: engine flags and sampling flags in one parser,
    # the sampling ones popped, the rest passed as LLM(**args).
    parser = engine_parser()
    sampling = parser.add_argument_group("sampling parameters")
    sampling.add_argument("--max-tokens", type=int)
    sampling.add_argument("--temperature", type=float)
    parser.set_defaults(model=qwen3_tied)
    args = vars(parser.parse_args(["--max_tokens", "3", "--temperature=0", "--kvcache-block-size", "16"]))
    max_tokens, temperature = args.pop("max_tokens"), args.pop("temperature")
    assert (max_tokens, temperature) == (3, 0.0)
    model = args.pop("model")
    config = make_config(model, args)
    assert config.model == qwen3_tied and config.kvcache_block_size == 16


def test_llm_accepts_the_kwargs(qwen3_tied):
    kwargs = EngineArgs(
        model=qwen3_tied, kvcache_block_size=16, num_kvcache_blocks=4, max_model_len=64, device="cpu"
    ).to_kwargs()
    with LLM(**kwargs) as llm:
        params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
        (out,) = llm.generate([[1, 2, 3]], params, use_tqdm=False)
    assert len(out["token_ids"]) == 2


@pytest.mark.parametrize(
    "argv, value", [([], None), (["--torch-compile"], True), (["--no_torch_compile"], False)]
)
def test_torch_compile_is_three_valued(argv, value):
    assert engine_parser().parse_args(argv).torch_compile is value


def test_choices_and_types_are_checked_by_the_parser(capsys):
    parser = engine_parser()
    for argv in (["--dtype", "float8"], ["--load-format", "pt"], ["--max-num-seqs", "many"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
    assert "invalid" in capsys.readouterr().err


def test_from_cli_args_ignores_other_attributes():
    args = argparse.Namespace(model="m", max_num_seqs=3, max_tokens=9, temperature=0.5)
    engine_args = EngineArgs.from_cli_args(args)
    assert engine_args.model == "m" and engine_args.max_num_seqs == 3
    assert engine_args.max_num_batched_tokens == EngineArgs().max_num_batched_tokens


# ---- FlexibleArgumentParser --------------------------------------------------------------------------


def test_values_are_not_rewritten():
    parser = FlexibleArgumentParser()
    parser.add_argument("--tokenizer-dir")
    parser.add_argument("rest", nargs="*")
    args = parser.parse_args(["--tokenizer_dir", "my_tok_dir", "--", "--not_an_option"])
    assert args.tokenizer_dir == "my_tok_dir" and args.rest == ["--not_an_option"]
    args = parser.parse_args(["--tokenizer_dir=a_b=c_d"])
    assert args.tokenizer_dir == "a_b=c_d"


def test_an_option_registered_with_underscores_still_works():
    parser = FlexibleArgumentParser()
    parser.add_argument("--num_prompts", type=int)
    assert parser.parse_args(["--num_prompts", "2"]).num_prompts == 2


def test_parse_known_args_normalises_too():
    parser = FlexibleArgumentParser()
    parser.add_argument("--max-num-seqs", type=int)
    args, extra = parser.parse_known_args(["--max_num_seqs=5", "--other_flag"])
    assert args.max_num_seqs == 5 and extra == ["--other-flag"]
