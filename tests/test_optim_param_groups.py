"""Parameter routing by module: embeddings and the output head take the fallback rule by default."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_spectral.optim import Muon, MuonSGD, SpectralBall, build_param_groups
from lightning_spectral.optim.base import AUX_ADAMW
from lightning_spectral.optim.param_groups import parameter_roles, routing_table, split_by_rule, unsharded_class


class TinyLM(nn.Module):
    """Embedding → two hidden Linears → an output Linear tied to the embedding, plus a LayerNorm."""

    def __init__(self, tied: bool = True):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.hidden = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.norm = nn.LayerNorm(16)
        self.out = nn.Linear(16, 50, bias=False)
        if tied:
            self.out.weight = self.embed.weight

    def forward(self, tokens):
        return self.out(self.norm(self.hidden(self.embed(tokens))))


def mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Conv1d(1, 1, 1), nn.Linear(16, 4))


def layout(groups):
    return {g["name"]: (g["matrix"], g["param_names"]) for g in groups}


def test_default_rule_table():
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 16), nn.Linear(16, 4))
    assert layout(build_param_groups(model)) == {
        "matrix": (True, ["0.weight", "2.weight"]),
        "head": (False, ["3.weight"]),  # the last Linear in registration order
        "vector": (False, ["0.bias", "1.weight", "1.bias", "2.bias", "3.bias"]),
    }
    groups = build_param_groups(model, head_as_matrix=True)
    assert layout(groups)["matrix"] == (True, ["0.weight", "2.weight", "3.weight"]) and "head" not in layout(groups)
    assert groups[0]["opted_in"] == ["head"]


def test_embeddings_and_tied_head():
    tied = TinyLM(tied=True)
    assert layout(build_param_groups(tied)) == {
        "matrix": (True, ["hidden.0.weight", "hidden.2.weight"]),
        "embedding": (False, ["embed.weight"]),  # shared with out.weight: named once, tied
        "vector": (False, ["hidden.0.bias", "hidden.2.bias", "norm.weight", "norm.bias"]),
    }
    assert parameter_roles(tied)[id(tied.embed.weight)] == "tied"
    # a tied weight takes the matrix rule only when both options opt in
    assert "embedding" in layout(build_param_groups(tied, embeddings_as_matrices=True))
    assert "embedding" in layout(build_param_groups(tied, head_as_matrix=True))
    both = layout(build_param_groups(tied, embeddings_as_matrices=True, head_as_matrix=True))
    assert both["matrix"][1] == ["embed.weight", "hidden.0.weight", "hidden.2.weight"]

    untied = TinyLM(tied=False)
    groups = layout(build_param_groups(untied))
    assert groups["embedding"] == (False, ["embed.weight"]) and groups["head"] == (False, ["out.weight"])
    groups = layout(build_param_groups(untied, embeddings_as_matrices=True))
    assert groups["matrix"][1] == ["embed.weight", "hidden.0.weight", "hidden.2.weight"] and "head" in groups


def test_head_patterns_and_exclude():
    model = TinyLM(tied=False)
    groups = layout(build_param_groups(model, head=["hidden.2"]))  # a named head instead of the last Linear
    assert groups["head"] == (False, ["hidden.2.weight"]) and "out.weight" in groups["matrix"][1]
    groups = layout(build_param_groups(model, head=[]))
    assert "head" not in groups and "out.weight" in groups["matrix"][1]
    groups = build_param_groups(model, exclude=["out.*"], vector_weight_decay=0.0)
    assert "out.weight" in layout(groups)["vector"][1] and groups[-1]["weight_decay"] == 0.0
    assert "weight_decay" not in next(g for g in groups if g["name"] == "embedding")  # keeps the optimizer's
    with pytest.raises(ValueError, match=r"head patterns \['decoder'\] match no module"):
        build_param_groups(model, head=["decoder"])
    with pytest.raises(TypeError, match="got the string 'out'"):
        build_param_groups(model, head="out")


def test_conv_only_model_has_no_head():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    assert set(layout(build_param_groups(model))) == {"matrix", "vector"}


def test_use_muon_key_is_the_matrix_key():
    """Keller Jordan's MuonWithAuxAdam groups: ``use_muon`` chooses the rule, the group's own keys win."""
    model = TinyLM(tied=False)
    hidden = [p for n, p in model.named_parameters() if n.startswith("hidden") and p.ndim >= 2]
    others = [p for n, p in model.named_parameters() if not (n.startswith("hidden") and p.ndim >= 2)]
    groups = [dict(params=hidden, use_muon=True, lr=0.02, weight_decay=0.01),
              dict(params=others, use_muon=False, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.0)]
    opt = Muon(groups)
    assert [(g["matrix"], g["lr"], len(g["params"])) for g in opt.param_groups] == [(True, 0.02, 2), (False, 3e-4, 6)]
    assert opt.param_groups[1]["algorithm"] == "adamw" and opt.param_groups[1]["betas"] == (0.9, 0.95)
    split = split_by_rule([dict(params=[model.embed.weight], use_muon=False)])
    assert split[0]["matrix"] is False and len(split) == 1  # not re-split by ndim
    with pytest.raises(ValueError, match="use_muon=True.*ndim >= 2"):
        split_by_rule([dict(params=[model.norm.weight], use_muon=True)])
    with pytest.raises(ValueError, match="disagree|same thing"):
        split_by_rule([dict(params=hidden, use_muon=True, matrix=False)])


def test_embedding_update_follows_the_fallback():
    """The embedding group is updated by AdamW at fallback_lr, not by msign (one step from zero state)."""
    torch.manual_seed(0)
    model = TinyLM(tied=False)
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = Muon(build_param_groups(model), lr=0.02, fallback_lr=1e-3, weight_decay=0.0)
    tokens = torch.randint(0, 50, (4, 6))
    loss = model(tokens).logsumexp(-1).mean()
    loss.backward()
    grad = model.embed.weight.grad.clone()
    opt.step()
    step = model.embed.weight.detach() - ref["embed.weight"]
    expected = -1e-3 * grad / (grad.abs() + 1e-8)  # AdamW's first step: lr·sign(g) where g ≠ 0
    assert torch.allclose(step, expected, atol=3e-7)  # float32 round-off of weights of size ~1
    assert torch.count_nonzero(step.abs().sum(1)) < 50  # rows of unused tokens do not move


def test_routing_table_and_warning():
    model = TinyLM(tied=False)
    opt = SpectralBall(build_param_groups(model), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = routing_table(opt, model)
    lines = table.splitlines()
    assert [c.strip() for c in lines[0].split("|")[1:-1]] == ["parameter", "shape", "group", "rule", "lr",
                                                              "weight_decay", "module"]
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]] for r in lines[2:]}
    assert len(rows) == sum(1 for _ in model.parameters())
    aux_lr = f"{AUX_ADAMW['lr']:.3g}"  # the auxiliary AdamW's defaults: lr 3e-4, no weight decay
    assert rows["embed.weight"] == ["50×16", "embedding", "fallback adamw", aux_lr, "0", "Embedding"]
    assert rows["out.weight"] == ["50×16", "head", "fallback adamw", aux_lr, "0", "Linear (head)"]
    assert rows["hidden.0.weight"][:3] == ["32×16", "matrix", "SpectralBall"]
    assert rows["norm.bias"][:2] == ["16", "vector"]

    # bare parameters: the optimizer cannot tell; the table with the model warns, once, naming them
    bare = Muon(model.parameters())
    with pytest.warns(UserWarning, match=r"matrix rule was given embed\.weight \(embedding\), out\.weight \(head\)"):
        routing_table(bare, model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # opted in: no warning
        routing_table(Muon(build_param_groups(model, embeddings_as_matrices=True, head_as_matrix=True)), model)
        routing_table(torch.optim.SGD(model.parameters(), lr=0.1), model)  # one rule for all: nothing to warn
    assert "| #0.0 " in routing_table(Muon([torch.nn.Parameter(torch.randn(3, 3))]))  # no names known
    wrapper = type("Wrapper", (), {"optimizer": opt})()  # as LightningModule.optimizers() returns
    assert routing_table(wrapper, model) == table


def test_package_optimizers_and_torch_take_the_same_groups():
    model = mlp()
    for opt in (MuonSGD(build_param_groups(model), lr=0.1, spectral_budget=0.1),
                torch.optim.AdamW(build_param_groups(model), lr=1e-3)):
        assert [g["name"] for g in opt.param_groups] == ["matrix", "head", "vector"]


def test_routing_table_names_the_original_module_class_under_fsdp2(tmp_path):
    """FSDP2's fully_shard turns a Linear into a dynamic ``FSDPLinear``; the table shows ``Linear``."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        mesh = init_device_mesh("cpu", (1,))
        for layer in (model[0], model[2], model):
            fully_shard(layer, mesh=mesh)
        assert type(model[0]).__name__ == "FSDPLinear" and type(model).__name__ == "FSDPSequential"
        assert unsharded_class(model) is nn.Sequential and unsharded_class(model[0]) is nn.Linear
        from lightning_spectral.resume import qualname  # the network class a checkpoint records

        assert qualname(model) == "torch.nn.modules.container.Sequential"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the head in the matrix group: not what this test is about
            table = routing_table(Muon(model.parameters(), lr=0.02), model)
    finally:
        dist.destroy_process_group()
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    assert {row[0]: row[-1] for row in rows} == {"0.weight": "Linear", "0.bias": "Linear",
                                                 "2.weight": "Linear (head)", "2.bias": "Linear"}, table


class _TiedGPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte, self.h = nn.Embedding(50, 16), nn.Linear(16, 16)
        self.lm_head = nn.Linear(16, 50, bias=False)
        self.lm_head.weight = self.wte.weight


class _Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok_embeddings, self.hidden, self.fc = nn.Embedding(20, 8), nn.Linear(8, 8), nn.Linear(8, 3)


@pytest.mark.parametrize("net, expected", [(_TiedGPT, ["wte.weight (embedding)"]),
                                           (_Classifier, ["tok_embeddings.weight (embedding)", "fc.weight (output head)"])])
def test_named_parameters_routed_by_shape_warn_naming_embeddings_and_the_head(net, expected):
    """What build_param_groups(model) would give the fallback (its embedding and head rows), named
    when an optimizer gets named parameters without a matrix/use_muon key; not from bare tensors,
    explicit groups or the model."""
    from lightning_spectral.optim import create_optimizer

    model = net()
    roles = parameter_roles(model)
    with pytest.warns(UserWarning, match="routed by shape alone") as caught:
        Muon(model.named_parameters())
    message = str(caught[0].message)
    assert all(name in message for name in expected) and "hidden.weight" not in message and "h.weight" not in message
    named = dict(model.named_parameters())
    assert {id(named[e.split(" ")[0]]) for e in expected} <= set(roles)  # the model's own rule agrees
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Muon(model.parameters())
        create_optimizer(model, "muon")
        Muon([{"params": [(n, p) for n, p in model.named_parameters() if p.ndim == 2], "use_muon": True}])
