"""ringify composed with FSDP2 and DDP on a 2-D (dp x cp) mesh of real gloo ranks, exact.

The README's training recipe, as it is written there: ``fully_shard`` on each HF Llama layer and on
the model over ``mesh["dp"]``, then ``ringify(model, mesh["cp"], outputs="local")``; each dp replica
trains on its own batch, the same on its cp ranks. After each backward every parameter's gradient (a
DTensor sharded over dp) equals the mean over the replicas of the single-device gradients, and after
each optimizer step the parameters equal the single-device model's: two steps. Each rank holds 1/dp of
the parameters and gradients. DDP over dp around the ringified model, likewise. Then the wrappings
that cannot be composed, each refused with what to change.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from ringify import UnsupportedModelError, ringify
from ringify.verify import relative_error

VOCAB = 97
STEPS = 2


def _llama(seed: int):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = tf.LlamaForCausalLM(cfg).train()
    for p in model.parameters():  # large enough weights that a wrong gradient or a stale shard shows
        p.data.normal_(0, 0.1)
    return model


def _batches(seed: int, dp: int, seq_len: int) -> list[list[torch.Tensor]]:
    """batches[step][replica]: fresh random ids, the same on every rank."""
    g = torch.Generator().manual_seed(seed + 1)
    return [[torch.randint(0, VOCAB, (2, seq_len), generator=g) for _ in range(dp)] for _ in range(STEPS)]


def _reference_steps(model, batches, lr: float) -> list[dict]:
    """Single-device training on the mean gradient of the replicas' batches: per step the gradients."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    grads = []
    for step in batches:
        opt.zero_grad()
        for ids in step:
            (model(input_ids=ids, labels=ids).loss / len(step)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
    return grads


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def check_data_parallel(wrap: str, seed: int, seq_len: int, dp: int = 2, compile_: bool = False) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    cp = dist.get_world_size() // dp
    mesh = init_device_mesh("cpu", (dp, cp), mesh_dim_names=("dp", "cp"))
    replica = mesh["dp"].get_local_rank()
    model = _llama(seed)
    reference = copy.deepcopy(model)
    batches = _batches(seed, dp, seq_len)
    lr = 0.05
    ref_grads = _reference_steps(reference, batches, lr)

    if wrap == "fsdp":  # the README's recipe
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        rm = ringify(model, mesh["cp"], outputs="local")
        train = torch.compile(rm, backend="aot_eager") if compile_ else rm
    else:
        rm = ringify(model, mesh["cp"], outputs="local")
        train = DDP(rm, process_group=mesh["dp"].get_group())
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    errors = {}
    for step, per_replica in enumerate(batches):
        opt.zero_grad()
        ids = per_replica[replica]
        loss = train(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: _full(p.grad) for n, p in model.named_parameters()}
        scale = max(g.norm().item() for g in ref_grads[step].values())
        errors[f"grad{step}"] = max(((grads[n] - g).norm() / max(g.norm(), 1e-3 * scale)).item()
                                    for n, g in ref_grads[step].items())
        opt.step()
    ref_params = dict(reference.named_parameters())
    errors["params"] = max(relative_error(_full(p.detach()), ref_params[n].detach()) for n, p in model.named_parameters())
    assert max(errors.values()) < 1e-5, errors
    if wrap == "fsdp":  # each rank holds 1/dp of the parameters and of the gradients
        total = sum(p.numel() for p in reference.parameters())
        local = sum(p.to_local().numel() for p in model.parameters())
        local_grads = sum(p.grad.to_local().numel() for p in model.parameters())
        assert local <= total / dp + 64 * dp and local_grads == local, (local, local_grads, total)
        assert all(r["kind"] == "fsdp" for r in rm.report(cost=False).regions) and len(rm.report(cost=False).regions) == 2
    return errors


@pytest.mark.parametrize("wrap", ["fsdp", "ddp"])
def test_two_by_two(ranks, seed, wrap):
    ranks(4).run(check_data_parallel, wrap, seed, 13)


@pytest.mark.slow
def test_fsdp_compiled(ranks, seed):
    ranks(4).run(check_data_parallel, "fsdp", seed, 11, 2, True)


@pytest.mark.slow
def test_fsdp_dp_only(ranks, seed):
    """dp=2 x cp=1: the ring is one rank, FSDP2 does all the sharding."""
    ranks(2).run(check_data_parallel, "fsdp", seed, 9)


def check_refusals(seed: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(seed))
    seen = {}

    model = _llama(seed)  # FSDP2 over the same ranks as the ring
    fully_shard(model, mesh=mesh["cp"])
    with pytest.raises(UnsupportedModelError, match="share ranks") as err:
        ringify(model, mesh["cp"])(input_ids=ids, labels=ids)
    seen["overlap"] = str(err.value)

    with pytest.raises(ValueError, match="1-D DeviceMesh.*mesh\\['cp'\\]") as err:
        ringify(_llama(seed), mesh)
    seen["2-D ring"] = str(err.value)

    model = _llama(seed)  # two modules in one FSDP2 group
    fully_shard([model.model.layers[0], model.model.layers[1]], mesh=mesh["dp"])
    with pytest.raises(UnsupportedModelError, match="fully_shard on each module separately") as err:
        ringify(model, mesh["cp"])(input_ids=ids, labels=ids)
    seen["grouped"] = str(err.value)

    model = _llama(seed)
    inner = DDP(model.model, process_group=mesh["dp"].get_group())
    model.model = inner
    with pytest.raises(UnsupportedModelError, match="wrap DDP around the ringified model") as err:
        ringify(model, mesh["cp"])(input_ids=ids, labels=ids)
    seen["ddp inside"] = str(err.value)
    return seen


def test_refused_wrappings(ranks, seed):
    ranks(4).run(check_refusals, seed)
