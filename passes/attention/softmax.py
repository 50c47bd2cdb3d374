"""Hand-written attention, anchored on a softmax over the last dim:

    scores = q @ k^T                  (matmul / bmm / mm / baddbmm / einsum, 2-D..4-D)
    scores = scale, soft-cap, masks, casts, sinks, a B*H split     (see `scores`)
    p      = softmax(scores, -1) -> casts -> [..., :-1] (drop the sink column) -> dropout -> B*H merge
    out    = p @ v                    (matmul / bmm / mm / einsum)

The einsum spelling names its dims with letters of its own; `_roles_einsum` maps them onto the layout
letters (B H S K D E) by what each letter does: the contracted one is D, the one only q has is S, ...
"""

from __future__ import annotations

from torch import fx

from ..fx import arg
from ..graph import live_users, upstream_within
from .candidate import Candidate, MatchContext
from .layouts import Operand, batch_letters, is_symbolic, norm_dim, same, unmerge
from .ops import CASTS, DROPOUT, IDENTITY, SCORE_OPS, SLICE, VALUE_OPS, aten, scalar
from .results import HINT_GENERAL, HINT_SEQUENCE, HINT_WEIGHTS, NoMatch, fmt, tensor_shape
from .scores import Step, fold, walk_scores


def _drops_sink_column(node: fx.Node) -> bool:
    """``p[..., :-1]``: the slice that drops the last column of the probabilities."""
    shape = tensor_shape(node.args[0])
    dim, start, end, step = (arg(node, n) for n in ("dim", "start", "end", "step"))
    if norm_dim(dim, len(shape)) != len(shape) - 1 or (start or 0) != 0 or (step or 1) != 1:
        return False
    return end == -1 or (end is not None and same(end, shape[-1] - 1))


def _walk_probs(sm: fx.Node, ctx: MatchContext, sinks: bool, split: bool) -> tuple[list[fx.Node], float, fx.Node]:
    """From the softmax forward to p @ v; returns (cast/slice/dropout/merge nodes, dropout p, value op).
    Scores that were split from [B*H, S, K] into [B, H, S, K] (`split`) must be merged back, once."""
    node, steps, p, dropped = sm, [], 0.0, False
    for _ in range(16):
        users = live_users(node, ctx.live)
        if len(users) != 1:
            names = ", ".join(fmt(u) for u in users) or "nothing"
            raise NoMatch(
                f"the attention probabilities `{node.name}` are used by {names}; only p @ v is understood",
                HINT_WEIGHTS if len(users) > 1 else HINT_GENERAL,
            )
        (u,) = users
        if u.target in CASTS or u.target in IDENTITY or (sinks and not dropped and u.target in SLICE
                                                         and _drops_sink_column(u)):
            dropped = dropped or u.target in SLICE
            steps.append(u)
            node = u
            continue
        if split and unmerge(u) is node:
            split = False
            steps.append(u)
            node = u
            continue
        if u.target in DROPOUT:
            prob, train = arg(u, "p", 0.5), arg(u, "train", True)
            if not isinstance(prob, (int, float)) or not isinstance(train, bool):
                raise NoMatch(f"dropout with a non-constant p at {fmt(u)}")
            p = float(prob) if train else 0.0
            steps.append(u)
            node = u
            continue
        if u.target in VALUE_OPS:
            first = u.args[1][0] if u.target is aten.einsum.default else u.args[0]
            second = u.args[1][1] if u.target is aten.einsum.default else u.args[1]
            if first is node and second is not node:
                if split:
                    raise NoMatch(f"the probabilities split into [B, H, S, K] are not merged back before {fmt(u)}",
                                  "view them back to [B*H, S, K] for the bmm with the values")
                if sinks and not dropped:
                    raise NoMatch(f"the sink column of the probabilities is not dropped before {fmt(u)}",
                                  "drop it with probs[..., :-1]")
                return steps, p, u
        raise NoMatch(f"the attention probabilities flow into {fmt(u)}, not into p @ v")
    raise NoMatch("too many ops between softmax and p @ v")


def _parse_einsum(eq: str, ndims: list[int]) -> tuple[list[str], str]:
    eq = eq.replace(" ", "")
    if "->" not in eq:
        raise NoMatch(f"einsum {eq!r} without an explicit output", "write the '->' output")
    lhs, rhs = eq.split("->")
    ins = lhs.split(",")
    if len(ins) != 2:
        raise NoMatch(f"einsum {eq!r} does not have two operands")
    spare = [c for c in "ZYXWVUTSRQPONMLKJIHGFEDCBA" if c not in eq]
    n_ell = max([nd - (len(s) - 3) for s, nd in zip(ins, ndims) if "..." in s] or [0])
    ell = "".join(spare[:n_ell])
    out = []
    for s, nd in zip(ins, ndims):
        if "..." in s:
            k = nd - (len(s) - 3)
            s = s.replace("...", ell[n_ell - k :])
        if len(s) != nd or len(set(s)) != len(s):
            raise NoMatch(f"einsum {eq!r}: subscripts do not match the operands (or repeat a letter)")
        out.append(s)
    rhs = rhs.replace("...", ell)
    return out, rhs


def _roles_einsum(score: fx.Node, out: fx.Node) -> tuple[Operand, Operand, Operand, str, str]:
    (qs, ks), ss = _parse_einsum(score.args[0], [len(tensor_shape(a)) for a in score.args[1]])
    (ps, vs), os_ = _parse_einsum(out.args[0], [len(tensor_shape(a)) for a in out.args[1]])
    kl = ss[-1]
    contracted = (set(qs) & set(ks)) - set(ss)
    qls = [c for c in ss if c in qs and c not in ks]
    if kl not in ks or kl in qs or len(contracted) != 1 or len(qls) != 1:
        raise NoMatch(f"einsum {score.args[0]!r} is not q·k^T contracting the head dim into [..., q, k]")
    (dl,), ql = contracted, qls[0]
    batch = [c for c in ss if c not in (ql, kl)]
    if set(qs) != set(batch) | {ql, dl} or set(ks) != set(batch) | {kl, dl} or len(batch) > 2:
        raise NoMatch(f"einsum {score.args[0]!r}: q and k must share their batch letters (at most two)")
    if len(ps) != len(ss):
        raise NoMatch(f"einsum {out.args[0]!r} does not read the probabilities")
    role = dict(zip(batch, "BH"))
    role.update({ql: "S", kl: "K", dl: "D"})
    pmap = {pc: role[sc] for pc, sc in zip(ps, ss)}  # letters of eq 2 -> roles
    extra = [c for c in vs if c not in pmap]
    if len(extra) != 1:
        raise NoMatch(f"einsum {out.args[0]!r} is not p·v over the key dim")
    pmap[extra[0]] = "E"
    v_roles = "".join(pmap[c] for c in vs)
    o_roles = "".join(pmap.get(c, "?") for c in os_)
    batch_roles = "".join(role[c] for c in batch)
    if set(v_roles) != set(batch_roles) | {"K", "E"} or set(o_roles) != set(batch_roles) | {"S", "E"}:
        raise NoMatch(f"einsum {out.args[0]!r} is not p·v over the key dim")
    q = Operand(score.args[1][0], "".join(role[c] for c in qs))
    k = Operand(score.args[1][1], "".join(role[c] for c in ks))
    v = Operand(out.args[1][1], v_roles)
    return q, k, v, "".join(role[c] for c in ss), o_roles


def match_softmax(sm: fx.Node, ctx: MatchContext) -> Candidate:
    shape = tensor_shape(sm)
    dim = norm_dim(sm.args[1], len(shape))
    if dim != len(shape) - 1:
        raise NoMatch(
            f"softmax over dim {sm.args[1]} of a {len(shape)}-D tensor, not over the last (key) dim",
            HINT_SEQUENCE,
        )
    score, steps = walk_scores(sm.args[0])
    splits = [s for s in steps if s.kind == "split"]
    if len(splits) > 1:
        raise NoMatch(f"the scores are reshaped twice, at {fmt(splits[0].node)} and {fmt(splits[1].node)}")
    post, dropout_p, out = _walk_probs(sm, ctx, sinks=any(s.kind == "sinks" for s in steps), split=bool(splits))

    alpha, bias = 1.0, []
    if score.target is aten.einsum.default:
        if out.target is not aten.einsum.default:
            raise NoMatch(f"einsum scores {fmt(score)} with {fmt(out)} for p @ v", "use einsum for both or neither")
        q, k, v, score_layout, out_layout = _roles_einsum(score, out)
        form = "einsum"
    else:
        if out.target is aten.einsum.default:
            raise NoMatch(f"{fmt(score)} scores with einsum {fmt(out)} for p @ v", "use einsum for both or neither")
        if score.target is aten.baddbmm.default:
            c, a, b = score.args[:3]
            beta, alpha = scalar(score.kwargs.get("beta", 1)), scalar(score.kwargs.get("alpha", 1))
            if beta is None or alpha is None:
                raise NoMatch(f"baddbmm with non-constant beta/alpha at {fmt(score)}")
            bias.append(Step("add", score, mask=c, value=beta))
            form = "baddbmm"
        else:
            a, b = score.args[:2]
            form = {aten.bmm.default: "bmm", aten.mm.default: "matmul", aten.matmul.default: "matmul"}[score.target]
        nd = len(tensor_shape(a))
        if len(tensor_shape(b)) != nd or len(tensor_shape(out.args[1])) != nd or len(tensor_shape(score)) != nd:
            raise NoMatch(f"{fmt(score)} broadcasts tensors of different ranks")
        bl = batch_letters(nd, fmt(score))
        if splits:
            if nd != 3:
                raise NoMatch(f"{fmt(splits[0].node)} splits the scores of a {nd}-D {fmt(score)}, not of [B*H, S, K]")
            bl = "N"
        q, k, v = Operand(a, bl + "SD"), Operand(b, bl + "DK"), Operand(out.args[1], bl + "KE")
        score_layout, out_layout = bl + "SK", bl + "SE"

    for step in bias + steps:  # the letters each step sees: a split turns N into B, H
        if step.kind == "split":
            score_layout = "BH" + score_layout[1:]
        step.layout = score_layout
    folded = fold(bias + steps, alpha)
    sinks = folded.pop("sinks")
    region = {score, sm, out, *post, *(s.node for s in steps), *(n for s in steps for n in s.extra)}
    return Candidate(form=form, anchor=sm, out=out, q=q, k=k, v=v, score_layout=score_layout, out_layout=out_layout,
                     region=region, dropout_p=dropout_p, sinks=Operand(sinks, score_layout) if sinks is not None
                     else None, heads=int(splits[0].value) if splits else None, **folded)


def looks_like_attention(sm: fx.Node, ctx: MatchContext) -> bool:
    """A softmax mixes the sequence when its dim is sequence-sized (symbolic) or when it is fed by a
    product of two activations (static-shape captures)."""
    try:
        shape = tensor_shape(sm)
        if is_symbolic(shape[norm_dim(sm.args[1], len(shape))]):
            return True
    except (NoMatch, IndexError, TypeError):
        return True
    for n in upstream_within(ctx.g, sm, 8):
        if n.op == "call_function" and n.target in SCORE_OPS:
            tensors = n.args[1] if n.target is aten.einsum.default else n.args[:2]
            if all(isinstance(t, fx.Node) and t.op != "get_attr" for t in tensors):
                return True
    return False
