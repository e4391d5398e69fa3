"""A first call that starts at once (issue 25): ``import alambic`` and a plain ``distill()`` import neither
``torch._dynamo`` nor ``torch.distributed.tensor`` (1.5-4 s on a first call), train exactly as the usual
path does once ``torch._dynamo`` is loaded, and leave PyTorch's optimizer as they found it. Each check runs
in a fresh interpreter, since these modules stay imported once any test imports them. Timings live in
``benchmarks/first_call.py``, not here."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

TINY_CALL = textwrap.dedent(
    """
    import json, sys, warnings
    import torch
    {before}
    import alambic
    after_import = {{m: m in sys.modules for m in ("torch._dynamo", "torch.distributed.tensor")}}
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(96, 12, generator=generator), torch.randint(0, 3, (96,), generator=generator))
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
    student = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trained = alambic.distill(teacher, student, DataLoader(data, batch_size=32, shuffle=True), epochs=2,
                                  optimizer="{optimizer}", lr=0.05, progress=False, {extra})
    cached = [getattr(getattr(torch.optim.Optimizer, name).__wrapped__, "__dynamo_disable", None)
              for name in ("add_param_group", "zero_grad", "state_dict", "load_state_dict")]
    marks = [getattr(value, "__qualname__", "?") for value in cached if value is not None]
    print(json.dumps({{
        "after_import": after_import,
        "after_call": {{m: m in sys.modules for m in ("torch._dynamo", "torch.distributed.tensor")}},
        "weights": [value.flatten().tolist() for value in trained.state_dict().values()],
        "scheduler_warnings": [str(w.message) for w in caught if "lr_scheduler" in str(w.message)],
        "marks_left": marks,
    }}))
    """
)


def _run(before: str = "", optimizer: str = "sgd", extra: str = "") -> dict:
    code = TINY_CALL.format(before=before, optimizer=optimizer, extra=extra)
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_import_and_a_plain_call_do_not_import_the_compiler(optimizer):
    run = _run(optimizer=optimizer)
    assert run["after_import"] == {"torch._dynamo": False, "torch.distributed.tensor": False}
    assert run["after_call"] == {"torch._dynamo": False, "torch.distributed.tensor": False}
    assert run["scheduler_warnings"] == []  # the LR scheduler saw each optimizer step
    assert run["marks_left"] == []  # PyTorch's optimizer is left as it was: nothing cached


def test_the_short_path_trains_exactly_as_the_usual_one():
    """With ``torch._dynamo`` imported first, Accelerate's prepare/unwrap and the optimizer's own methods run;
    the weights are bit-identical to those of the path that skips them (SGD with momentum: every state)."""
    short, usual = _run(extra="momentum=0.9"), _run(before="import torch._dynamo", extra="momentum=0.9")
    assert usual["after_call"]["torch._dynamo"] and not short["after_call"]["torch._dynamo"]
    assert short["weights"] == usual["weights"]


@pytest.mark.slow
def test_compile_imports_the_compiler():
    """``compile=True`` (torch.compile on CPU: seconds) is what brings ``torch._dynamo`` in."""
    run = _run(extra="compile=True")
    assert run["after_call"]["torch._dynamo"]
    assert not [mark for mark in run["marks_left"] if "_deferred_mark" in mark]  # what PyTorch caches itself
