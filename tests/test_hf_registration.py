"""``--optim trainable_to``: name registration, ``--optim_args``, the start-up hook, argument round trips."""

from __future__ import annotations

import copy
import enum
import inspect
import json
import multiprocessing
import os
import pickle
import re
import site
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import _hf_to_startup
from hf_to import TrainableOptimizer
from hf_to.integrations import transformers as integration

transformers = pytest.importorskip("transformers")
from transformers import HfArgumentParser, Trainer, TrainingArguments  # noqa: E402
from transformers.training_args import OptimizerNames  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _hook_installed() -> bool:
    dirs = [*site.getsitepackages(), site.getusersitepackages()]
    return any(Path(d, "hf_to_hook.pth").is_file() for d in dirs)


needs_installed_hook = pytest.mark.skipif(
    not _hook_installed(),
    reason="needs hf-to installed with pip (install / install -e) so that hf_to_hook.pth is in site-packages",
)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", _hf_to_startup.ENV_DISABLE)}
    env.update(extra)
    return env


def _args(tmp_path: Path, **kw: object) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path / "out"), optim="trainable_to", report_to="none", **kw)


# -- the name ------------------------------------------------------------------------------


def test_trainable_to_is_an_optimizer_name_after_import_hf_to() -> None:
    assert OptimizerNames("trainable_to") is OptimizerNames.TRAINABLE_TO
    assert OptimizerNames.TRAINABLE_TO == "trainable_to"
    assert integration.is_registered()


def test_registration_is_idempotent_and_keeps_every_member() -> None:
    before = [(m.name, m.value, m) for m in OptimizerNames]
    integration.register()
    integration.register()
    after = [(m.name, m.value, m) for m in OptimizerNames]
    assert after == before
    assert all(a[2] is b[2] for a, b in zip(after, before))


class Names(str, enum.Enum):
    A = "a"
    B = "b"


def test_enum_extension_adds_one_member_and_changes_no_existing_one() -> None:
    a, b = Names.A, Names.B
    member = integration._add_enum_member(Names, "NEW", "new")
    assert integration._add_enum_member(Names, "NEW", "new") is member
    assert [m.value for m in Names] == ["a", "b", "new"]
    assert Names("a") is a and Names.B is b and Names["NEW"] is member and Names("new") is member
    assert pickle.loads(pickle.dumps(member)) is member
    with pytest.raises(ValueError):
        Names("missing")


def test_trainer_dispatches_the_name_to_trainable_optimizer(tmp_path: Path) -> None:
    args = _args(tmp_path, learning_rate=3e-4, weight_decay=0.05, adam_beta2=0.95, adam_epsilon=1e-6)
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert cls is TrainableOptimizer
    assert kwargs["lr"] == 3e-4 and kwargs["weight_decay"] == 0.05
    assert kwargs["beta2"] == 0.95 and kwargs["eps"] == 1e-6


def test_paper_form_takes_no_adam_settings(tmp_path: Path) -> None:
    args = _args(tmp_path, optim_args="preconditioner=none", adam_beta2=0.95)
    _, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert kwargs["preconditioner"] == "none"
    assert "beta2" not in kwargs and "eps" not in kwargs


def test_unsupported_transformers_version_fails_with_a_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transformers, "__version__", "4.40.0")
    with pytest.raises(RuntimeError, match=r"supports transformers >=4\.46,<6\.0; found 4\.40\.0"):
        integration.register()


def test_help_lists_the_name() -> None:
    text = HfArgumentParser(TrainingArguments).format_help()
    assert re.search(r"--optim \{[^}]*\btrainable_to\b", text)


# -- --optim_args --------------------------------------------------------------------------


def test_optim_args_keys_come_from_the_optimizer_signature() -> None:
    signature = set(inspect.signature(TrainableOptimizer).parameters) - {"params", "lr", "weight_decay"}
    assert set(integration.optim_arg_types()) == signature


def test_optim_args_are_typed_from_the_defaults(tmp_path: Path) -> None:
    args = _args(tmp_path, optim_args="estimator=rank_one, alpha=0.02,beta=1,diagnostics=false,max_full_numel=64")
    _, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert kwargs["estimator"] == "rank_one"
    assert kwargs["alpha"] == 0.02 and isinstance(kwargs["alpha"], float)
    assert kwargs["beta"] == 1.0 and isinstance(kwargs["beta"], float)
    assert kwargs["diagnostics"] is False
    assert kwargs["max_full_numel"] == 64 and isinstance(kwargs["max_full_numel"], int)


BAD_OPTIM_ARGS = [
    ("nonsense=1", r"Unknown --optim_args key 'nonsense'.*valid keys: .*alpha.*estimator"),
    ("estimator", r"Malformed --optim_args entry 'estimator'"),
    ("estimator=rank_one,,alpha=0.1", r"Malformed --optim_args entry ''"),
    ("alpha=0.1=2", r"Malformed --optim_args entry"),
    ("alpha=abc", r"key 'alpha': 'abc' is not a valid float"),
    ("max_full_numel=1.5", r"key 'max_full_numel': '1.5' is not a valid int"),
    ("diagnostics=maybe", r"key 'diagnostics': 'maybe' is not a valid bool"),
    ("fused=2", r"key 'fused': '2' is not a valid bool or none"),
    ("nesterov=maybe", r"key 'nesterov': 'maybe' is not a valid float"),
    ("nesterov=1.5", r"Invalid nesterov: 1.5"),
    ("state_dtype=int9", r"key 'state_dtype': 'int9' is not a valid dtype or none"),
    ("estimator=huge", r"Invalid estimator: 'huge'"),
    ("beta=2", r"Invalid beta: 2.0"),
    ("lr=0.1", r"'lr' is not accepted.*--learning_rate"),
    ("weight_decay=0.1", r"'weight_decay' is not accepted.*--weight_decay"),
    ("alpha=0.1,alpha=0.2", r"key 'alpha' is given twice"),
]


@pytest.mark.parametrize(("optim_args", "message"), BAD_OPTIM_ARGS, ids=[b[0] for b in BAD_OPTIM_ARGS])
def test_bad_optim_args_fail_when_the_arguments_are_parsed(tmp_path: Path, optim_args: str, message: str) -> None:
    out = tmp_path / "out"
    parser = HfArgumentParser(TrainingArguments, exit_on_error=False)
    argv = ["--output_dir", str(out), "--optim", "trainable_to", "--optim_args", optim_args, "--report_to", "none"]
    with pytest.raises(ValueError, match=message):
        parser.parse_args_into_dataclasses(args=argv)
    assert not out.exists()


def test_bad_optim_args_on_the_command_line_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = HfArgumentParser(TrainingArguments, prog="train.py")
    argv = ["--output_dir", str(tmp_path / "out"), "--optim", "trainable_to", "--optim_args", "fused=maybe"]
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args_into_dataclasses(args=argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "train.py: error: Invalid value for --optim_args key 'fused': 'maybe' is not a valid bool or none "
        "(expected one of 1, true, yes, on, 0, false, no, off)"
    ]


# Spellings a user types for each type of keyword, and the value each one means.
SPELLINGS: dict[type, dict[str, object]] = {
    bool: {"true": True, "True": True, "1": True, "yes": True, "false": False, "False": False, "0": False, "no": False},
    torch.dtype: {
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "torch.bfloat16": torch.bfloat16,
        "float32": torch.float32,
        "fp32": torch.float32,
        "torch.float32": torch.float32,
    },
    int: {"64": 64, "1e3": 1000},
    float: {"0.05": 0.05, "1": 1.0, "1e-4": 1e-4},
}
NONE_SPELLINGS = {"none": None, "None": None, "null": None}
KEYWORDS = sorted(integration.optim_arg_types())


def _spellings(key: str) -> dict[str, object]:
    param = inspect.signature(TrainableOptimizer, eval_str=True).parameters[key]
    typ, nullable = integration._keyword_type(param)
    if typ is str:
        spellings: dict[str, object] = {str(param.default): param.default} if isinstance(param.default, str) else {}
    else:
        spellings = dict(SPELLINGS.get(typ, {}))
    if nullable:
        spellings.update(NONE_SPELLINGS)
    return spellings


def test_every_constructor_keyword_can_be_given_on_the_command_line() -> None:
    # A keyword whose type --optim_args cannot read (a tuple, a callable, ...) needs a parser
    # in hf_to.integrations.transformers._PARSERS, or a default of a type that has one.
    assert integration.unparsable_keywords() == []
    missing = [key for key in KEYWORDS if not _spellings(key)]
    assert not missing, f"no command-line spellings known for {missing}: add them to SPELLINGS in this test"


@pytest.mark.parametrize("key", KEYWORDS)
def test_optim_args_accept_the_spellings_users_type_for_every_keyword(key: str) -> None:
    for raw, expected in _spellings(key).items():
        value = integration.parse_optim_args(f"{key}={raw}")[key]
        assert value == expected and type(value) is type(expected), (key, raw, value)


@pytest.mark.parametrize("key", KEYWORDS)
def test_every_keyword_reaches_the_optimizer_from_the_command_line(tmp_path: Path, key: str) -> None:
    default = inspect.signature(TrainableOptimizer).parameters[key].default
    raw = "none" if default is None else str(default).lower() if isinstance(default, bool) else str(default)
    parser = HfArgumentParser(TrainingArguments)
    argv = ["--output_dir", str(tmp_path), "--optim", "trainable_to", "--optim_args", f"{key}={raw}"]
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    _, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert kwargs[key] == default


@pytest.mark.parametrize(
    ("optim_args", "key", "expected"),
    [
        ("fused=false", "fused", False),
        ("fused=False", "fused", False),
        ("fused=0", "fused", False),
        ("fused=true", "fused", True),
        ("fused=none", "fused", None),
        ("state_dtype=bfloat16", "state_dtype", torch.bfloat16),
        ("state_dtype=bf16", "state_dtype", torch.bfloat16),
        ("state_dtype=torch.bfloat16", "state_dtype", torch.bfloat16),
        ("state_dtype=fp32", "state_dtype", torch.float32),
        ("state_dtype=none", "state_dtype", None),
        ("nesterov=0.55", "nesterov", 0.55),
        ("nesterov=true", "nesterov", True),
        ("nesterov=False", "nesterov", False),
    ],
)
def test_fused_and_state_dtype_build_the_optimizer_from_the_command_line(
    tmp_path: Path, optim_args: str, key: str, expected: object
) -> None:
    args = _args(tmp_path, optim_args=optim_args)
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert kwargs[key] == expected
    optimizer = cls([torch.nn.Parameter(torch.zeros(4))], **kwargs)
    assert optimizer.param_groups[0][key] == expected


def test_optim_args_of_other_optimizers_are_not_checked(tmp_path: Path) -> None:
    args = TrainingArguments(output_dir=str(tmp_path), optim="sgd", optim_args="momentum=0.9", report_to="none")
    assert args.optim == "sgd"


# -- TrainingArguments round trips ---------------------------------------------------------


def test_training_arguments_survive_to_dict_and_json(tmp_path: Path) -> None:
    args = _args(tmp_path, optim_args="estimator=rank_one")
    assert args.to_dict()["optim"] == "trainable_to"
    assert json.loads(args.to_json_string())["optim"] == "trainable_to"
    rebuilt = TrainingArguments(**{k: v for k, v in args.to_dict().items() if k in _init_fields()})
    assert rebuilt.optim is OptimizerNames.TRAINABLE_TO


def _init_fields() -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(TrainingArguments) if f.init}


def test_training_arguments_survive_deepcopy_and_pickle(tmp_path: Path) -> None:
    args = _args(tmp_path, optim_args="estimator=rank_one")
    assert copy.deepcopy(args).optim is OptimizerNames.TRAINABLE_TO
    restored = pickle.loads(pickle.dumps(args))
    assert restored.optim is OptimizerNames.TRAINABLE_TO and restored.optim_args == "estimator=rank_one"


def _child_optim(args: TrainingArguments, queue: multiprocessing.Queue) -> None:
    queue.put((args.optim.value, type(args.optim).__name__, args.optim_args))


@needs_installed_hook
def test_training_arguments_reach_a_spawn_child(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_optim, args=(_args(tmp_path, optim_args="estimator=rank_one"), queue))
    child.start()
    result = queue.get(timeout=240)
    child.join(timeout=60)
    assert child.exitcode == 0
    assert result == ("trainable_to", "OptimizerNames", "estimator=rank_one")


@needs_installed_hook
def test_training_args_bin_reloads_in_a_process_that_never_imports_hf_to(tmp_path: Path) -> None:
    path = tmp_path / "training_args.bin"
    torch.save(_args(tmp_path, optim_args="estimator=rank_one"), path)  # what Trainer._save writes
    code = textwrap.dedent(
        f"""
        import sys, torch
        args = torch.load({str(path)!r}, weights_only=False)
        print(args.optim.value, args.optim_args)
        """
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["trainable_to", "estimator=rank_one"]


# -- the start-up hook ---------------------------------------------------------------------

SCRIPT = """
import sys
import torch
from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

(args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses()
config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, vocab_size=64, max_position_embeddings=32)
torch.manual_seed(0)
ids = torch.randint(0, 64, (16, 8))
data = [{"input_ids": x, "labels": x} for x in ids]
trainer = Trainer(model=LlamaForCausalLM(config), args=args, train_dataset=data)
trainer.train()
group = trainer.optimizer.param_groups[0]
print("RESULT", type(trainer.optimizer.optimizer).__name__, group["estimator"], trainer.state.global_step)
"""


def _run_script(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    argv = [
        sys.executable, str(script), "--output_dir", str(tmp_path / "out"), "--optim", "trainable_to",
        "--optim_args", "estimator=rank_one", "--max_steps", "3", "--per_device_train_batch_size", "2",
        "--report_to", "none", "--use_cpu", "--save_strategy", "no", "--disable_tqdm", "true",
    ]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, env=_env(**env), cwd=tmp_path)


@needs_installed_hook
def test_a_script_that_never_imports_hf_to_trains_with_optim_trainable_to(tmp_path: Path) -> None:
    assert "hf_to" not in SCRIPT
    run = _run_script(tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "RESULT TrainableOptimizer rank_one 3" in run.stdout


@needs_installed_hook
def test_with_the_hook_disabled_the_script_fails_with_transformers_own_error(tmp_path: Path) -> None:
    run = _run_script(tmp_path, **{_hf_to_startup.ENV_DISABLE: "1"})
    assert run.returncode != 0
    assert "argument --optim: invalid choice: 'trainable_to'" in run.stderr


def _startup_probe(**env: str) -> dict[str, object]:
    code = (
        "import json, sys; print(json.dumps({'finder': any(type(f).__name__ == '_RegisteringFinder' "
        "for f in sys.meta_path), 'heavy': sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('torch', 'transformers', 'hf_to', 'numpy'))}))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(**env), check=True)
    return json.loads(run.stdout)


@needs_installed_hook
def test_the_hook_is_armed_at_start_up_without_importing_torch_or_transformers() -> None:
    assert _startup_probe() == {"finder": True, "heavy": []}


@needs_installed_hook
def test_the_environment_variable_turns_the_hook_off() -> None:
    assert _startup_probe(**{_hf_to_startup.ENV_DISABLE: "1"}) == {"finder": False, "heavy": []}


@needs_installed_hook
def test_the_hook_costs_under_5_ms_at_start_up() -> None:
    # "import time: self [us] | cumulative [us] | name" for the module the .pth line imports;
    # the best of five runs, so that a busy machine does not decide the result.
    times = []
    for _ in range(5):
        run = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True, env=_env(), check=True
        )
        lines = [line for line in run.stderr.splitlines() if line.rstrip().endswith(" _hf_to_startup")]
        assert lines, run.stderr[-2000:]
        times.append(int(lines[0].split("|")[1]))
    assert min(times) < 5000


def test_an_error_inside_the_hook_is_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom() -> None:
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(integration, "register", boom)
    monkeypatch.setattr(_hf_to_startup, "_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _hf_to_startup._register("transformers.training_args")
        _hf_to_startup._register("transformers.trainer")
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "simulated failure" in messages[0]


def test_the_finder_never_raises_and_ignores_other_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    finder = _hf_to_startup._RegisteringFinder()
    assert finder.find_spec("json") is None
    monkeypatch.setattr(_hf_to_startup, "_warned", True)  # keep the test quiet

    class Broken:
        def find_spec(self, *args: object) -> None:
            raise OSError("broken finder")

    monkeypatch.setattr(sys, "meta_path", [finder, Broken()])
    assert finder.find_spec("transformers.training_args") is None


def test_import_hf_to_does_not_import_transformers() -> None:
    code = "import sys, hf_to; print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))"
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=_env(PYTHONPATH=str(REPO))
    )
    assert run.stdout.strip() == "[]"


def test_rank_one_with_a_deepspeed_config_is_refused_when_the_optimizer_arguments_are_built():
    """The Trainer-side check runs with the optim_args, before any model is loaded.

    (transformers itself refuses ``deepspeed=`` without the deepspeed package, so the
    arguments are a stand-in with the fields the check reads.)
    """
    from types import SimpleNamespace

    import pytest

    from hf_to.integrations.transformers import to_kwargs_from_training_args

    def args(optim_args, deepspeed):
        return SimpleNamespace(
            learning_rate=1e-4,
            weight_decay=0.0,
            adam_beta2=0.999,
            adam_epsilon=1e-8,
            optim_args=optim_args,
            deepspeed=deepspeed,
        )

    with pytest.raises(ValueError, match="estimator='rank_one' cannot run under DeepSpeed"):
        to_kwargs_from_training_args(args("estimator=rank_one", "ds_zero2.json"))
    assert to_kwargs_from_training_args(args("estimator=diagonal", "ds_zero2.json"))["estimator"] == "diagonal"
    assert to_kwargs_from_training_args(args("estimator=rank_one", None))["estimator"] == "rank_one"
    with pytest.raises(ValueError, match=r"tune_beta=1\.0 cannot run under DeepSpeed"):
        to_kwargs_from_training_args(args("tune_beta=1.0", "ds_zero2.json"))
    assert to_kwargs_from_training_args(args("tune_beta=1.0", None))["tune_beta"] == 1.0
