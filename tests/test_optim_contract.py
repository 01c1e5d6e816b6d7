"""The ``torch.optim.Optimizer`` contract, as PyTorch states it for its own optimizers, over every
optimizer of the registry on CPU.

Our own port of the generic tests of PyTorch's ``test/test_optim.py`` (``TestOptimRenewed``),
with the inputs of its ``OptimizerInfo`` entries (``torch.testing._internal.common_optimizers``):
the same problems, steps and assertions, run on each registry entry in its test configurations
and, for ``Muon``, on the inputs of torch's own Muon entry. ``torch.optim.Muon`` runs through the
same port as a row of its own, so the port is checked against the optimizer it was written for.
Where we differ from torch on purpose, the difference is a row of :data:`DELIBERATE` with a test of
its own below (search for its key); the port applies only these adaptations:

- shapes: an optimizer whose set takes only some matrices (square, even, ...) gets its registry
  ``example_shape`` where torch's test has a 10×5 (or 2×3) weight (``shapes``);
- constrained optimizers move the weights onto their set when they are built, so "unchanged"
  compares with the weights after construction (``constrained``);
- torch's own Muon takes no 1-D tensor: its row drops the bias, as torch's test does.

torch's tests that cannot apply on a CPU (CUDA, fused, foreach, capturable, multi-device) or to
optimizers without complex/sparse support are left out, as torch's ``OptimizerInfo`` leaves them.
"""

from __future__ import annotations

import copy
import functools
import io
import math
import pickle
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch
from torch import nn
from torch.nn import Parameter
from torch.optim.lr_scheduler import ReduceLROnPlateau, StepLR
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from lightning_spectral.optim import Muon, optimizer_entries

pytestmark = pytest.mark.usefixtures("single_thread")


# -- the catalogue: one row per optimizer ------------------------------------------------------------
# torch's Muon entry (common_optimizers.optim_inputs_func_muon), written out: (description, kwargs).
TORCH_MUON_INPUTS = [
    ("default", {}),
    ("non-default lr", {"lr": 0.01}),
    ("Tensor lr", {"lr": torch.tensor(0.001)}),
    ("non-default weight_decay", {"weight_decay": 0.2}),
    ("non-default momentum", {"momentum": 0.8}),
    ("passing alternative ns_steps", {"ns_steps": 6}),
    ("passing alternative ns_coefficients", {"ns_coefficients": (3.4, -4.7, 2.0)}),
    ("match_rms_adamw lr adjustment", {"adjust_lr_fn": "match_rms_adamw"}),
    ("spectral_unclamped lr adjustment", {"adjust_lr_fn": "spectral_unclamped"}),
]


@dataclass
class Row:
    """One optimizer under the contract: its class, its inputs (torch's ``OptimizerInfo.optim_inputs_func``)."""

    name: str
    cls: type
    inputs: list[tuple[str, dict[str, Any]]]
    shape: tuple[int, int] = (10, 5)
    constrained: bool = False
    every_shape: bool = True  # its rule takes every matrix: torch's shapes
    only_2d: bool = False  # torch.optim.Muon
    base: dict[str, Any] = field(default_factory=dict)  # under every call: a BlockStiefel's block size
    kwargs: Callable[[dict], dict] = field(default=lambda kw: kw)

    def inputs_fresh(self) -> list[tuple[str, dict[str, Any]]]:
        """The inputs, copied (a tensor lr is mutated by schedulers)."""
        return [(desc, {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()})
                for desc, kw in self.inputs]

    def make(self, params, **kwargs):
        return self.cls(params, **self.kwargs({**self.base, **kwargs}))


def _entry_row(entry) -> Row:
    if entry.cls is Muon:
        inputs = TORCH_MUON_INPUTS
    else:
        inputs = [(variant, kw) for variant, kw in entry.configurations()]
        lr = entry.test_kwargs.get("lr", 1e-3)
        inputs.append(("Tensor lr", {**entry.test_kwargs, "lr": torch.tensor(lr)}))
    return Row(entry.name, entry.cls, inputs, shape=entry.example_shape, constrained=entry.constrained,
               every_shape=entry.every_shape, base={} if entry.cls is Muon else dict(entry.test_kwargs),
               kwargs=lambda kw, e=entry: e.kwargs("default", **kw) if any(k.startswith("solver_") for k in kw) else kw)


ROWS = {entry.name: _entry_row(entry) for entry in optimizer_entries()}
ROWS["torch.optim.Muon"] = Row("torch.optim.Muon", torch.optim.Muon, TORCH_MUON_INPUTS, only_2d=True)
# The default suite runs each row's first two inputs; -m slow runs them all.
QUICK = 2


def rows():
    """Parametrize over the rows (with :func:`inputs_of`: the inputs beyond the first ``QUICK`` run under ``-m slow``)."""
    return pytest.mark.parametrize("row", [pytest.param(ROWS[name], id=name) for name in ROWS])


@pytest.fixture(params=["quick", pytest.param("all", marks=pytest.mark.slow)])
def inputs_of(request):
    return lambda row: row.inputs_fresh()[:QUICK] if request.param == "quick" else row.inputs_fresh()[QUICK:]


def weight_and_bias(row: Row, contiguous: bool = True, dtype=torch.float32):
    out, inp = row.shape
    if contiguous:
        weight, bias = Parameter(torch.randn(out, inp, dtype=dtype)), Parameter(torch.randn(out, dtype=dtype))
    else:
        weight = Parameter(torch.randn(out, inp, 2, dtype=dtype)[..., 0])
        bias = Parameter(torch.randn(out, 2, dtype=dtype)[..., 0])
    return weight, bias, torch.randn(inp, dtype=dtype)


def params_of(row: Row, weight, bias):
    return [weight] if row.only_2d else [weight, bias]


def loss_fn(row: Row, weight, bias, x):
    return (weight.mv(x) if row.only_2d else weight.mv(x) + bias).pow(2).sum()


def assert_equal(a, b):
    """torch's ``TestCase.assertEqual`` on tensors: ``torch.testing.assert_close``'s dtype tolerances."""
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_equal(x, y)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), (a.keys(), b.keys())
        for k in a:
            assert_equal(a[k], b[k])
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a.detach(), b.detach())
    else:
        assert a == b, (a, b)


# -- TestOptimRenewed, ported -------------------------------------------------------------------------
GLOBAL_CLIQUEY = ("foreach", "fused", "differentiable")


@rows()
def test_optim_inputs_do_not_specify_global_cliquey_kwargs(row):
    for _, kwargs in row.inputs:
        assert not any(flag in kwargs for flag in GLOBAL_CLIQUEY)


def _error_inputs(row: Row):
    """torch's ``get_error_inputs_for_all_optims`` (on a matrix of the row's shape) and the Muon entry's."""
    p1, p2 = Parameter(torch.randn(row.shape)), Parameter(torch.randn(row.shape))
    cases = [
        (p1, {}, TypeError, "params argument given to the optimizer should be an iterable of Tensors or dicts"),
        ([p1, p1], {}, UserWarning, ".*a parameter group with duplicate parameters.*"),
        ([{"params": p1}, {"params": p1}], {}, ValueError, "some parameters appear in more than one parameter group"),
        ([p1], dict(lr=torch.tensor([0.001, 0.001])), ValueError, "Tensor lr must be 1-element"),
        ([("weight", p1), p2], {}, ValueError,
         "all optimizer params should be with/without names. Some param names are missing"),
        ([{"params": [p1], "lr": 1e-2}, {"params": [("weight", p2)]}], {}, ValueError,
         "all optimizer param groups should be with/without names. cannot add param group with names to the optimizer"),
    ]
    if row.cls in (Muon, torch.optim.Muon):
        cases.append(([p1], {"adjust_lr_fn": "arbitrary"}, ValueError,
                      "Adjust learning rate function arbitrary is not supported"))
    return cases


@rows()
def test_errors(row):
    for params, kwargs, error, match in _error_inputs(row):
        if issubclass(error, Warning):
            with pytest.warns(error, match=match):
                row.make(params, **kwargs)
        else:
            with pytest.raises(error, match=match):
                row.make(params, **kwargs)


@rows()
@pytest.mark.parametrize("with_lrsched", [False, True])
@pytest.mark.parametrize("contiguous", [True, False])
def test_forloop_goes_right_direction(row, contiguous, with_lrsched, inputs_of):
    schedulers_constructors = ([lambda opt: StepLR(opt, gamma=0.9, step_size=10)], [lambda opt: ReduceLROnPlateau(opt)]
                               ) if with_lrsched else [None]
    for schedulers_constructor in schedulers_constructors:
        for _, kwargs in inputs_of(row):
            weight, bias, x = weight_and_bias(row, contiguous)
            optimizer = row.make(params_of(row, weight, bias), **kwargs)
            schedulers = [s(optimizer) for s in (schedulers_constructor or [])]

            def closure():
                optimizer.zero_grad()
                loss = loss_fn(row, weight, bias, x)
                loss.backward()
                return loss

            initial_value = closure().item()
            for _ in range(20):
                loss = closure()
                optimizer.step()
                for scheduler in schedulers:
                    scheduler.step(loss) if isinstance(scheduler, ReduceLROnPlateau) else scheduler.step()
            assert closure().item() < initial_value


@rows()
def test_param_group_with_lrscheduler_goes_right_direction(row):
    for schedulers_c in ([lambda opt: StepLR(opt, gamma=0.9, step_size=10)], [lambda opt: ReduceLROnPlateau(opt)]):
        weight, weight2 = Parameter(torch.randn(row.shape)), Parameter(torch.randn(row.shape))
        x = torch.randn(row.shape[1])
        optimizer = row.make([{"params": [weight]}, {"params": [weight2], "lr": 0.01}])
        schedulers = [s(optimizer) for s in schedulers_c]

        def closure():
            optimizer.zero_grad()
            loss = (weight.mv(x) + weight2.mv(x)).pow(2).sum()
            loss.backward()
            return loss

        initial_value = closure().item()
        for _ in range(20):
            loss = optimizer.step(closure)
            for scheduler in schedulers:
                scheduler.step(loss) if isinstance(scheduler, ReduceLROnPlateau) else scheduler.step()
        assert closure().item() < initial_value


@rows()
@pytest.mark.parametrize("num_dim", [0, 1, 2])
def test_tensor_lr(row, num_dim, inputs_of):
    for _, kwargs in inputs_of(row):
        weight, bias, x = weight_and_bias(row)
        weight_c, bias_c = weight.detach().clone().requires_grad_(True), bias.detach().clone().requires_grad_(True)
        kwargs = {k: v for k, v in kwargs.items() if k != "lr"}
        optimizer_r = row.make(params_of(row, weight, bias), lr=1e-3, **kwargs)
        optimizer = row.make(params_of(row, weight_c, bias_c), lr=torch.tensor(1e-3).reshape([1] * num_dim), **kwargs)

        def closure(optim, w, b):
            optim.zero_grad()
            loss = loss_fn(row, w, b, x)
            loss.backward()
            return loss

        for _ in range(5):
            closure(optimizer_r, weight, bias)
            optimizer_r.step()
            closure(optimizer, weight_c, bias_c)
            optimizer.step()
            assert_equal(weight, weight_c)
            if not row.only_2d:
                assert_equal(bias, bias_c)


@rows()
def test_param_groups_weight_decay(row, inputs_of):
    for _, kwargs in inputs_of(row):
        weight, bias, x = weight_and_bias(row)
        bias_kwargs = dict(kwargs, weight_decay=0.0)
        groups = [dict(params=[weight], **kwargs)] + ([] if row.only_2d else [dict(params=[bias], **bias_kwargs)])
        optimizer = row.make(groups)
        loss = loss_fn(row, weight, bias, x)
        initial_value = loss.item()
        for _ in range(20):
            optimizer.zero_grad()
            loss = loss_fn(row, weight, bias, x)
            loss.backward()
            optimizer.step()
        assert loss.item() < initial_value


@rows()
def test_param_groups_lr(row, inputs_of):
    for _, kwargs in inputs_of(row):
        if "lr" not in kwargs or kwargs["lr"] == 0:
            kwargs["lr"] = 1e-3
        weight, bias, x = weight_and_bias(row)
        irrelevant = Parameter(torch.randn((2, 2) if row.every_shape else row.shape))
        optimizer = row.make([dict(params=params_of(row, weight, bias), **kwargs), dict(params=[irrelevant])], lr=1e-28)
        # constrained: the weights as the optimizer built them, on the set
        irrelevant_clone = irrelevant.detach().clone()
        loss = loss_fn(row, weight, bias, x)
        initial_value = loss.item()
        for _ in range(20):
            optimizer.zero_grad()
            loss = loss_fn(row, weight, bias, x)
            loss.backward()
            irrelevant.grad = torch.rand_like(irrelevant)
            optimizer.step()
        assert loss.item() < initial_value
        assert_equal(irrelevant, irrelevant_clone)


@rows()
def test_step_is_noop_when_params_have_no_grad(row, inputs_of):
    params = [torch.randn(*row.shape, requires_grad=False) for _ in range(2)]
    for _, kwargs in inputs_of(row):
        optimizer = row.make(params, **kwargs)
        old = [p.detach().clone() for p in params]
        optimizer.step(lambda: torch.tensor([1.0]))
        assert_equal(old, params)


@rows()
def test_step_is_noop_for_zero_grads(row, inputs_of):
    shape = (5, 1) if row.every_shape else row.shape
    param = torch.randn(shape, requires_grad=True)
    for _, kwargs in inputs_of(row):
        if kwargs.get("weight_decay", 0) != 0:
            continue
        # decoupled weight decay moves the params regardless of the gradients: a small lr, as torch does
        kwargs["lr"] = torch.tensor(1e-5) if isinstance(kwargs.get("lr"), torch.Tensor) else 1e-5
        optimizer = row.make([param], **kwargs)
        old_param = param.detach().clone()  # (a constrained optimizer's start: on its set)
        param.grad = torch.zeros_like(param)
        optimizer.step(lambda: torch.tensor([1.0]))
        assert_equal(old_param, param)


@rows()
def test_optimizer_can_be_printed(row, inputs_of):
    params = [Parameter(torch.randn(*row.shape)) for _ in range(2)]
    for _, kwargs in inputs_of(row):
        assert type(row.cls).__name__ and row.make(params, **kwargs).__repr__().startswith(row.cls.__name__)


def _named(params, is_named):
    return [(f"name{i}", p) for i, p in enumerate(params)] if is_named else params


def _without_param_names(state_dict):
    state_dict = copy.deepcopy(state_dict)
    for group in state_dict["param_groups"]:
        group.pop("param_names", None)
    return state_dict


@rows()
@pytest.mark.parametrize("is_named_optim1", [True, False])
@pytest.mark.parametrize("is_named_optim0", [True, False])
def test_state_dict_deterministic(row, is_named_optim0, is_named_optim1, inputs_of):
    small = (2, 3) if row.every_shape else row.shape
    weight, bias = Parameter(torch.randn(small)), Parameter(torch.randn(small[0]))
    x = torch.randn(small[1])

    def fwd_bwd(optim, w, b):
        optim.zero_grad()
        loss = loss_fn(row, w, b, x)
        loss.backward()
        return loss

    for _, kwargs in inputs_of(row):
        optimizer = row.make(_named(params_of(row, weight, bias), is_named_optim0), **kwargs)
        closure = functools.partial(fwd_bwd, optimizer, weight, bias)
        for _ in range(10):
            closure()
            optimizer.step()
        with torch.no_grad():
            weight_c, bias_c = Parameter(weight.clone()), Parameter(bias.clone())
        optimizer_c = row.make(_named(params_of(row, weight_c, bias_c), is_named_optim1), **kwargs)
        closure_c = functools.partial(fwd_bwd, optimizer_c, weight_c, bias_c)
        optimizer_c.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        for _ in range(10):
            closure()
            closure_c()
            optimizer.step()
            optimizer_c.step()
            assert_equal(weight, weight_c)
            assert_equal(bias, bias_c)
        assert_equal(_without_param_names(optimizer.state_dict()), _without_param_names(optimizer_c.state_dict()))
        optimizer_c.param_groups.extend(optimizer_c.param_groups)
        assert_equal(_without_param_names(optimizer.state_dict())["param_groups"][-1],
                     _without_param_names(optimizer_c.state_dict())["param_groups"][-1])


def _conv_bn(row: Row):
    """torch's ``Conv2d(4, 2, 1, stride=2)`` + ``BatchNorm2d(2)`` (a 2×4 matrix), or one of the row's shape."""
    torch.manual_seed(1)
    out, inp = (2, 4) if row.every_shape else row.shape
    if row.only_2d:
        return nn.Sequential(nn.Flatten(0), nn.Linear(inp, out, bias=False)), torch.rand(inp)
    return nn.Sequential(nn.Conv2d(inp, out, 1, stride=2), nn.BatchNorm2d(out)), torch.rand(1, inp, 16, 16)


@rows()
def test_can_load_older_state_dict(row, inputs_of):
    """An older version's state dict has fewer group keys: here every key but ``params`` is gone
    (torch deletes its flags added since the first release), and it still loads and steps."""
    for _, kwargs in inputs_of(row):
        model, x = _conv_bn(row)
        optimizer = row.make(model.parameters(), **kwargs)

        def fwd_bwd():
            optimizer.zero_grad()
            loss = model(x).sum()
            loss.backward()
            return loss

        for _ in range(3):
            fwd_bwd()
            optimizer.step()
        old = copy.deepcopy(optimizer.state_dict())
        if not row.only_2d:
            old["param_groups"] = [{"params": g["params"]} for g in old["param_groups"]]
        optimizer.load_state_dict(old)
        fwd_bwd()
        optimizer.step()


@rows()
@pytest.mark.parametrize("is_named_optim1", [True, False])
@pytest.mark.parametrize("is_named_optim0", [True, False])
def test_can_load_from_to_named_state_dict(row, is_named_optim0, is_named_optim1, inputs_of):
    for _, kwargs in inputs_of(row):
        model, x = _conv_bn(row)

        def fwd_bwd(optim):
            optim.zero_grad()
            loss = model(x).sum()
            loss.backward()
            return loss

        optimizer = row.make(model.named_parameters() if is_named_optim0 else model.parameters(), **kwargs)
        for _ in range(3):
            fwd_bwd(optimizer)
            optimizer.step()
        old = copy.deepcopy(optimizer.state_dict())
        optimizer2 = row.make(model.named_parameters() if is_named_optim1 else model.parameters(), **kwargs)
        optimizer2.load_state_dict(old)
        fwd_bwd(optimizer2)
        optimizer2.step()
        if is_named_optim0 or is_named_optim1:
            # one group may be several here (matrix and fallback parts): their names together are torch's
            names = [n for g in optimizer2.state_dict()["param_groups"] for n in g["param_names"]]
            assert sorted(names) == sorted(n for n, _ in model.named_parameters())


@rows()
@pytest.mark.parametrize("is_named_optim", [True, False])
def test_save_load_equality_with_weights_only(row, is_named_optim, inputs_of):
    small = (2, 3) if row.every_shape else row.shape
    weight, bias = Parameter(torch.randn(small)), Parameter(torch.randn(small[0]))
    x = torch.randn(small[1])
    for _, kwargs in inputs_of(row):
        optimizer = row.make(_named(params_of(row, weight, bias), is_named_optim), **kwargs)

        def closure():
            optimizer.zero_grad()
            loss = loss_fn(row, weight, bias, x)
            loss.backward()
            return loss

        for _ in range(3):
            optimizer.step(closure)
        sd = optimizer.state_dict()
        with tempfile.TemporaryFile() as f:
            torch.save(sd, f)
            f.seek(0)
            assert_equal(torch.load(f), sd)
            f.seek(0)
            assert_equal(torch.load(f, weights_only=True), sd)


@rows()
def test_load_nontensor_step(row, inputs_of):
    params = [Parameter(torch.randn(*row.shape)) for _ in range(2)] + ([] if row.only_2d else
                                                                       [Parameter(torch.randn(row.shape[0]))])
    for p in params:
        p.grad = torch.rand_like(p)
    for _, kwargs in inputs_of(row):
        optimizer = row.make(params, **kwargs)
        for _ in range(3):
            optimizer.step()
        state_dict = copy.deepcopy(optimizer.state_dict())
        for p_state in state_dict["state"].values():
            if "step" in p_state and torch.is_tensor(p_state["step"]):
                p_state["step"] = p_state["step"].item()
        optimizer.load_state_dict(state_dict)
        optimizer.step()


def _state_dict_pre_hook(optimizer):
    optimizer.state["test"] = 1


def _state_dict_post_hook(optimizer, state_dict):
    if "test" in state_dict["state"]:
        state_dict["state"].pop("test")
        state_dict["ran_state_dict_pre_hook"] = True
    else:
        state_dict["ran_state_dict_pre_hook"] = False
    return state_dict


@rows()
def test_state_dict_hooks(row, inputs_of):
    """torch's test_state_dict_pre_hook, _post_hook and _pre_post_hook."""
    for _, kwargs in inputs_of(row):
        param = torch.rand(*row.shape, requires_grad=True)
        optim = row.make([param], **kwargs)
        optim.register_state_dict_pre_hook(_state_dict_pre_hook)
        assert optim.state_dict()["state"]["test"] == 1
        optim = row.make([torch.rand(*row.shape, requires_grad=True)], **kwargs)
        optim.register_state_dict_post_hook(_state_dict_post_hook)
        assert optim.state_dict()["ran_state_dict_pre_hook"] is False
        optim = row.make([torch.rand(*row.shape, requires_grad=True)], **kwargs)
        optim.register_state_dict_pre_hook(_state_dict_pre_hook)
        optim.register_state_dict_post_hook(_state_dict_post_hook)
        state_dict = optim.state_dict()
        assert "test" not in state_dict["state"] and state_dict["ran_state_dict_pre_hook"]


def _load_pre_hook1(optimizer, state_dict):
    state_dict["param_groups"][0]["lr"] = 0.002


def _load_pre_hook2(optimizer, state_dict):
    my_state_dict = copy.deepcopy(state_dict)
    my_state_dict["param_groups"][0]["lr"] = 0.003
    return my_state_dict


def _load_post_hook(optimizer):
    optimizer.state["ran_load_state_dict_pre_hook2"] = optimizer.param_groups[0]["lr"] == 0.003
    optimizer.state["ran_load_state_dict_post_hook"] = True


@rows()
def test_load_state_dict_hooks(row, inputs_of):
    """torch's test_load_state_dict_pre_hook_and_prepend, _post_hook and _pre_post_hook."""
    for _, kwargs in inputs_of(row):
        optim = row.make([torch.rand(*row.shape, requires_grad=True)], **kwargs)
        state_dict = optim.state_dict()
        optim.register_load_state_dict_pre_hook(_load_pre_hook1)
        optim.load_state_dict(state_dict)
        assert optim.param_groups[0]["lr"] == 0.002
        optim.register_load_state_dict_pre_hook(_load_pre_hook2, prepend=True)
        optim.load_state_dict(state_dict)
        assert optim.param_groups[0]["lr"] == 0.002
        optim = row.make([torch.rand(*row.shape, requires_grad=True)], **kwargs)
        optim.register_load_state_dict_post_hook(_load_post_hook)
        optim.load_state_dict(optim.state_dict())
        assert not optim.state["ran_load_state_dict_pre_hook2"] and optim.state["ran_load_state_dict_post_hook"]
        optim = row.make([torch.rand(*row.shape, requires_grad=True)], **kwargs)
        optim.register_load_state_dict_pre_hook(_load_pre_hook2)
        optim.register_load_state_dict_post_hook(_load_post_hook)
        optim.load_state_dict(optim.state_dict())
        assert optim.state["ran_load_state_dict_pre_hook2"] and optim.state["ran_load_state_dict_post_hook"]


@rows()
def test_step_hooks(row, inputs_of):
    """torch's test_step_post_hook, _pre_hook and _all_hooks (on a matrix: a constrained optimizer
    refuses to be built with nothing to constrain)."""
    params = [torch.ones(row.shape)]
    for _, kwargs in inputs_of(row):
        data = []
        optim = row.make(params, **kwargs)
        handle = optim.register_step_post_hook(lambda opt, args, kw: data.append("post"))
        pre = optim.register_step_pre_hook(lambda opt, args, kw: data.append("pre"))
        optim.step()
        optim.step()
        assert data == ["pre", "post", "pre", "post"]
        handle.remove()
        pre.remove()
        optim.step()
        assert len(data) == 4
        optim2, data = torch.optim.SGD(params), []
        handles = [register_optimizer_step_pre_hook(lambda *a: data.append(0)),
                   register_optimizer_step_post_hook(lambda *a: data.append(5)),
                   optim.register_step_pre_hook(lambda *a: data.append(1)),
                   optim.register_step_post_hook(lambda *a: data.append(2)),
                   optim2.register_step_pre_hook(lambda *a: data.append(1)),
                   optim2.register_step_post_hook(lambda *a: data.append(2))]
        optim.step()
        optim2.step()
        optim.step()
        assert data == [0, 1, 2, 5] * 3
        for h in handles:
            h.remove()
        optim.step()
        optim2.step()
        assert data == [0, 1, 2, 5] * 3


@rows()
def test_deepcopy_copies_all_public_attrs(row, inputs_of):
    params = [Parameter(torch.randn(*row.shape)) for _ in range(2)]
    for p in params:
        p.grad = torch.rand_like(p)

    def public(obj):
        return {k for k in obj.__dict__ if not k.startswith("_")}

    for _, kwargs in inputs_of(row):
        optimizer = row.make(params, **kwargs)
        for _ in range(3):
            optimizer.step()
        assert public(optimizer) == public(copy.deepcopy(optimizer))


@rows()
def test_non_empty_state(row, inputs_of):
    out, inp = (5, 5) if row.every_shape else row.shape
    model = nn.Linear(inp, out, bias=not row.only_2d)
    x = torch.rand(2, inp)
    for _, kwargs in inputs_of(row):
        optim = row.make(model.parameters(), **kwargs)
        optim.zero_grad()
        model(x).sum().backward()
        optim.step()
        for state in optim.state.values():
            assert len(state) > 0


# -- torch.compile of a step ---------------------------------------------------------------------------
def _compile_cases(backend: str, slow_constrained: bool):
    """Every registry entry's ``compile_variants`` (constrained ones, whose host-synced inner steps
    make 20-70 graphs to trace, under ``-m slow`` where asked)."""
    cases = []
    for entry in optimizer_entries():
        for variant in entry.compile_variants:
            marks = [pytest.mark.slow] if slow_constrained and entry.constrained else []
            cases.append(pytest.param(entry, variant, backend, id=f"{entry.name}:{variant}:{backend}", marks=marks))
    return cases


@pytest.mark.parametrize("entry, variant, backend", _compile_cases("eager", True) + [
    pytest.param(*case.values, marks=[pytest.mark.slow, pytest.mark.timeout(1200)], id=case.id)
    for case in _compile_cases("inductor", False)])
def test_compiled_step_matches_eager(entry, variant, backend):
    """``torch.compile(opt.step)`` beside the eager step on a copy of the same model and data: three
    steps (the first creates the state, the second recompiles for it, the third reuses it), equal
    weights and state tensors within float32's default tolerance (inductor's kernels may reorder a
    sum; the eager backend is bit-identical). Scalar state (SpectralBall's multiplier λ, the
    root of ⟨Θ, msign(G + λΘ)⟩ = 0, whose error is the residual's over a small slope) within
    √eps(float32) relative."""
    torch.manual_seed(0)
    out, inp = entry.example_shape
    eager_model = nn.Sequential(nn.Linear(inp, out), nn.Tanh(), nn.Linear(out, 3))
    compiled_model = copy.deepcopy(eager_model)
    eager, compiled = entry.build(eager_model.parameters(), variant), entry.build(compiled_model.parameters(), variant)
    torch._dynamo.reset()
    step = torch.compile(compiled.step, backend=backend)
    x = torch.randn(4, inp)
    for i in range(3):
        for model, run in ((eager_model, eager.step), (compiled_model, step)):
            model.zero_grad()
            model(x + i).pow(2).sum().backward()
            run()
    assert_equal(list(compiled_model.parameters()), list(eager_model.parameters()))
    tolerance = math.sqrt(torch.finfo(torch.float32).eps)
    for p, q in zip(eager_model.parameters(), compiled_model.parameters()):
        assert compiled.state[q].keys() == eager.state[p].keys()
        for key, value in eager.state[p].items():
            if isinstance(value, float) or (isinstance(value, torch.Tensor) and value.ndim == 0):
                assert math.isclose(float(compiled.state[q][key]), float(value), rel_tol=tolerance,
                                    abs_tol=tolerance), key
            else:
                assert_equal(compiled.state[q][key], value)


# -- where we differ from torch on purpose: one row each, each with its test ---------------------------
DELIBERATE = {
    "vectors_take_the_fallback": "a tensor with fewer than 2 dimensions takes the AdamW/SGD fallback; "
                                 "torch.optim.Muon refuses it",
    "conv_kernels_are_matrices": "an N-D tensor is stepped as its out × in·k·k matrix; torch.optim.Muon refuses it",
    "complex_refused_when_built": "a complex parameter is refused when the optimizer is built, naming it; "
                                  "torch.optim.Muon raises at the first step",
    "sparse_refused_naming_the_parameter": "a sparse gradient is refused before any weight changes, naming the "
                                           "parameter (an SGD fallback takes it, as torch.optim.SGD)",
    "nonfinite_gradient_refused": "a NaN/Inf gradient raises before any weight changes; torch steps the weights to NaN",
    "load_state_dict_checks_values": "a state dict with a negative lr or a NaN state tensor is refused; torch loads it",
    "constrained_start_on_their_set": "constrained optimizers move the weights onto their set when built",
}


def test_every_deliberate_difference_has_its_test():
    tests = {name for name in globals() if name.startswith("test_deliberate_")}
    assert tests == {f"test_deliberate_{key}" for key in DELIBERATE}


def _weight_and_bias(shape=(6, 4)):
    return nn.Parameter(torch.randn(shape)), nn.Parameter(torch.randn(shape[0]))


def test_deliberate_vectors_take_the_fallback():
    weight, bias = _weight_and_bias()
    with pytest.raises(ValueError, match="Muon only supports 2D parameters"):
        torch.optim.Muon([weight, bias])
    assert [g["matrix"] for g in Muon([weight, bias]).param_groups] == [True, False]


def test_deliberate_conv_kernels_are_matrices():
    kernel = nn.Parameter(torch.randn(4, 3, 3, 3))
    with pytest.raises(ValueError, match="Muon only supports 2D parameters"):
        torch.optim.Muon([kernel])
    flat = nn.Parameter(kernel.detach().reshape(4, 27).clone())
    ours, reference = Muon([kernel], lr=0.02), Muon([flat], lr=0.02)
    kernel.grad = torch.randn_like(kernel)
    flat.grad = kernel.grad.reshape(4, 27).clone()
    ours.step()
    reference.step()
    assert_equal(kernel.detach().reshape(4, 27), flat)


def test_deliberate_complex_refused_when_built():
    z = nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))
    theirs = torch.optim.Muon([z])
    z.grad = torch.randn_like(z)
    with pytest.raises(RuntimeError, match="Muon does not support complex parameters"):
        theirs.step()
    for entry in optimizer_entries():
        with pytest.raises(ValueError, match=r"does not support complex parameters: parameter 'z' is torch.complex64"):
            entry.build([("z", nn.Parameter(torch.randn(*entry.example_shape, dtype=torch.complex64)))])


@pytest.mark.parametrize("entry", [pytest.param(e, id=e.name) for e in optimizer_entries()])
def test_deliberate_sparse_refused_naming_the_parameter(entry):
    embedding, dense = nn.Embedding(10, 4, sparse=True), nn.Parameter(torch.randn(*entry.example_shape))
    theirs = torch.optim.Muon([embedding.weight])
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="Muon does not support sparse gradients"):
        theirs.step()
    for matrix in (False, True):
        opt = entry.build([{"params": [("emb.weight", embedding.weight)], "matrix": matrix},
                           {"params": [("dense", dense)]}], **({"fallback": "adamw"} if not matrix else {}))
        before = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
        dense.grad = torch.randn_like(dense)
        with pytest.raises(RuntimeError, match=r"does not support sparse gradients: the gradient of parameter "
                                               r"'emb.weight' is torch.sparse_coo; no weight was changed"):
            opt.step()
        assert_equal([p for g in opt.param_groups for p in g["params"]], before)
    # an SGD fallback takes it as torch.optim.SGD does
    weight = embedding.weight.detach().clone()
    opt = entry.build([{"params": [embedding.weight], "matrix": False}, {"params": [dense]}], fallback="sgd",
                      fallback_lr=0.1, fallback_momentum=0.0, fallback_weight_decay=0.0)
    reference = nn.Parameter(weight.clone())
    reference.grad = embedding.weight.grad.clone()
    opt.step()
    torch.optim.SGD([reference], lr=0.1).step()
    assert_equal(embedding.weight, reference)


def test_deliberate_nonfinite_gradient_refused():
    from lightning_spectral.optim import NonFiniteGradientError

    weight, _ = _weight_and_bias()
    theirs_weight = nn.Parameter(weight.detach().clone())
    weight.grad = torch.full_like(weight, float("nan"))
    theirs_weight.grad = weight.grad.clone()
    torch.optim.Muon([theirs_weight]).step()
    assert torch.isnan(theirs_weight).all()
    before = weight.detach().clone()
    with pytest.raises(NonFiniteGradientError):
        Muon([weight]).step()
    assert_equal(weight, before)


def test_deliberate_load_state_dict_checks_values():
    weight, _ = _weight_and_bias()
    state = Muon([weight]).state_dict()
    state["param_groups"][0]["lr"] = -0.01
    torch.optim.Muon([weight]).load_state_dict(copy.deepcopy(state))
    with pytest.raises(ValueError, match="lr must be >= 0"):
        Muon([weight]).load_state_dict(state)


def test_deliberate_constrained_start_on_their_set():
    for entry in optimizer_entries(constrained=True):
        weight = nn.Parameter(3 * torch.randn(*entry.example_shape))
        opt = entry.build([weight])
        group = opt.param_groups[0]
        assert opt._constraint_distance(group, weight, opt.state[weight]) <= 1e-3, entry.name
