"""One rule call for many parameters (``update_coordinates_many``) and the batched ν built on it."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import estimators
from estimators._exact import _row_width, _sample_stride, _sampled_nonlinearity_sums
from optimizers import linearize
from tests._helpers import assert_close, one_torch_thread  # noqa: F401  (autouse fixture)
from tests.optimizers.test_elementwise_more import OPTIMIZERS as MORE

# Two parameter groups that differ in a scalar (so the rule runs once per group), every
# elementwise optimizer and its flags.
FACTORIES = {
    "sgd-nesterov": lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda g: torch.optim.Adam(g, lr=1e-2),
    "adam-amsgrad-l2": lambda g: torch.optim.Adam(g, lr=1e-2, amsgrad=True, weight_decay=0.1),
    "adamw": lambda g: torch.optim.AdamW(g, lr=1e-2),
    "rmsprop-centered": lambda g: torch.optim.RMSprop(g, lr=1e-2, momentum=0.5, centered=True),
    "adagrad": lambda g: torch.optim.Adagrad(g, lr=0.1, lr_decay=0.01),
    **MORE,
}


def _setup(name, steps, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(7, 9), nn.Tanh(), nn.Linear(9, 3)).double()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    opt = FACTORIES[name]([{"params": first}, {"params": second, "lr": 3e-3}])
    x, y = torch.randn(16, 7, dtype=torch.float64), torch.randint(0, 3, (16,))
    for _ in range(steps + 1):
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if _ < steps:
            opt.step()
    return model, opt


@pytest.mark.parametrize("name", FACTORIES)
@settings(max_examples=6, deadline=None)
@given(steps=st.integers(0, 3), seed=st.integers(0, 2**16), strides=st.lists(st.integers(1, 5), min_size=4, max_size=4), m=st.integers(1, 4))
def test_many_parameters_in_one_call_equal_one_call_each(name, steps, seed, strides, m):
    model, opt = _setup(name, steps, seed)
    lin = linearize(opt)
    gen = torch.Generator().manual_seed(seed)
    items = []
    for p, step in zip(model.parameters(), strides):
        d = len(range(0, p.numel(), step))
        items.append((p, torch.randn(m, d, generator=gen, dtype=torch.float64), step))
    together = lin.update_coordinates_many(items)
    for (p, G, step), upd in zip(items, together):
        alone = lin.update_coordinates(p, G, 0, p.numel(), step)
        assert upd.shape == alone.shape == G.shape
        assert_close(upd, alone, rtol=1e-15, atol=0.0)


def test_a_linearization_group_evaluates_each_item_by_its_owner():
    model, adam = _setup("adam", 2, 0)
    sgd = torch.optim.SGD(model[2].parameters(), lr=0.1, momentum=0.9)
    adam = torch.optim.Adam(model[0].parameters(), lr=1e-2)
    for o in (adam, sgd):
        o.step()
    lin = linearize([adam, sgd])
    items = [(p, torch.randn(3, p.numel(), dtype=torch.float64), 1) for p in model.parameters()]
    for (p, G, _), upd in zip(items, lin.update_coordinates_many(items)):
        assert torch.equal(upd, lin.update_coordinates(p, G, 0, p.numel()))


def test_items_disagreeing_in_m_and_an_operator_rule_are_refused():
    model, opt = _setup("adam", 1, 0)
    lin = linearize(opt)
    w, b = model[0].weight, model[0].bias
    with pytest.raises(ValueError, match="same number m"):
        lin.update_coordinates_many([(w, torch.zeros(2, w.numel(), dtype=torch.float64), 1), (b, torch.zeros(3, b.numel(), dtype=torch.float64), 1)])
    muon = torch.optim.Muon([model[0].weight], lr=0.02)
    w.grad = torch.randn_like(w)
    with pytest.raises(TypeError, match="not elementwise"):
        linearize(muon).update_coordinates_many([(w, torch.zeros(1, w.numel(), dtype=torch.float64), 1)])


def _reference_sums(lin, p, val, max_coordinates):
    """ν's sums of one parameter from the full update (every coordinate), at the documented sample."""
    g = p.grad
    upd = lin.update_batch(p, torch.stack([torch.zeros_like(g), 0.5 * g, g])).reshape(3, -1)
    w = sum(v[p].reshape(-1).abs() for v in val)
    D = p.numel()
    stride = _sample_stride(D, max_coordinates, _row_width(p))  # all coordinates when D fits
    pick, scale = torch.arange(0, D, stride), float(stride)
    u, w = upd[:, pick], w[pick]
    return float((w * (u[1] - 0.5 * (u[0] + u[2])).abs()).sum()) * scale, float((w * (0.5 * (u[2] - u[0])).abs()).sum()) * scale


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd-nesterov", "nadam", "rprop", "adam-amsgrad-l2"])
@pytest.mark.parametrize("max_coordinates", [4, 20, 4096])
def test_batched_nonlinearity_equals_the_sums_over_the_full_update_at_its_sample(name, max_coordinates):
    model, opt = _setup(name, 2, 1)
    lin = linearize(opt)
    grads = {p: p.grad for p in model.parameters()}
    val = [{p: torch.randn_like(p) for p in model.parameters()} for _ in range(2)]
    parts = estimators.update_nonlinearity(lin, grads, val, per_parameter=True, max_coordinates=max_coordinates)
    assert list(parts) == list(grads)
    for p, (num, den) in parts.items():
        a, b = _reference_sums(lin, p, val, max_coordinates)
        assert num == pytest.approx(a, rel=1e-12, abs=1e-300)
        assert den == pytest.approx(b, rel=1e-12, abs=1e-300)
    if max_coordinates == 4096:  # the whole parameter: ν itself, against the per-parameter strided path
        for p, (num, den) in parts.items():
            a, b, stride = _sampled_nonlinearity_sums(lin, p, p.grad, [v[p] for v in val], max_coordinates)
            assert stride == 1 and num == pytest.approx(float(a), rel=1e-12) and den == pytest.approx(float(b), rel=1e-12)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 40), d=st.integers(1, 300), double=st.booleans(), seed=st.integers(0, 2**16))
def test_the_exact_routes_prefix_sums_are_cumsums_bit_for_bit(m, n, d, double, seed):
    from estimators._exact import _prefix_sums

    gen = torch.Generator().manual_seed(seed)
    cs = torch.randn(n, d, generator=gen, dtype=torch.float64 if double else torch.float32) * 10.0 ** torch.randint(-3, 4, (n, 1), generator=gen)
    orders = torch.stack([torch.randperm(n, generator=gen) for _ in range(m)])
    expected = torch.cat([torch.zeros(m, 1, d, dtype=cs.dtype), cs[orders].cumsum(1)], dim=1)
    assert torch.equal(_prefix_sums(cs, orders), expected)


def test_a_states_tensor_fields_are_read_once_and_a_replaced_state_reads_its_own():
    from optimizers import AdamState

    st_ = AdamState(lr=0.1, step=1, exp_avg=torch.ones(3), exp_avg_sq=torch.ones(3))
    first = st_.tensors()
    first.pop("exp_avg")  # the caller's copy: the state's own view is unchanged
    assert sorted(st_.tensors()) == ["exp_avg", "exp_avg_sq"]
    other = st_.map_tensors(lambda t: t * 2)
    assert torch.equal(other.tensors()["exp_avg"], torch.full((3,), 2.0)) and torch.equal(st_.tensors()["exp_avg"], torch.ones(3))
    assert "_tensor_fields" not in repr(st_)  # kept outside the fields


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_the_sampled_nonlinearity_of_a_sparsely_touched_table_is_close_to_the_whole_tables(seed):
    """ν of an embedding table lives on the rows the step touches: the sample must see many rows.

    A sample of 64 contiguous blocks (f183f60) saw one table row in 16 and put the bench
    decoder's table at ν 1.2-1.5 where the whole table's ν was 0.66-0.78, sending it to the
    exact route on steps that did not need it.
    """
    gen = torch.Generator().manual_seed(seed)
    emb = nn.Embedding(1024, 128)
    opt = torch.optim.AdamW(emb.parameters(), lr=1e-3)
    zipf = 1.0 / torch.arange(1, 1025, dtype=torch.float64)  # a few frequent tokens, a long tail
    for step in range(6):
        emb.zero_grad()
        tokens = torch.multinomial(zipf, 512, replacement=True, generator=gen)
        (emb(tokens) * torch.randn(512, 128, generator=gen)).sum().backward()
        if step < 5:
            opt.step()
    lin = linearize(opt)
    val = [{emb.weight: torch.randn(1024, 128, generator=gen)}]
    grads = {emb.weight: emb.weight.grad}
    (num, den), = estimators.update_nonlinearity(lin, grads, val, per_parameter=True).values()
    (full_num, full_den), = estimators.update_nonlinearity(lin, grads, val, per_parameter=True, max_coordinates=10**9).values()
    assert num / den == pytest.approx(full_num / full_den, rel=0.1)


@pytest.mark.parametrize("name", ["adamw", "sgd-nesterov", "rprop", "adam-amsgrad-l2"])
@pytest.mark.parametrize("tokens", [16, 512])
def test_nonlinearity_on_a_tables_touched_rows_is_the_whole_tables(name, tokens):
    """Off the rows a step touches g = 0, where no elementwise update moves with g: ν there is 0.

    Sampled on the rows (``rows=``), ν is the whole table's exactly when the rows' coordinates fit
    the sample (16 tokens: at most 16 rows of 128), and close to it when they are strided (512).
    """
    gen = torch.Generator().manual_seed(tokens)
    emb = nn.Embedding(1024, 128).double()
    opt = FACTORIES[name](emb.parameters())
    zipf = 1.0 / torch.arange(1, 1025, dtype=torch.float64)
    for step in range(4):
        emb.zero_grad()
        ids = torch.multinomial(zipf, tokens, replacement=True, generator=gen)
        (emb(ids) * torch.randn(tokens, 128, generator=gen, dtype=torch.float64)).sum().backward()
        if step < 3:
            opt.step()
    lin = linearize(opt)
    val = [{emb.weight: torch.randn(1024, 128, generator=gen, dtype=torch.float64)}]
    grads = {emb.weight: emb.weight.grad}
    rows = {emb.weight: ids.unique()}
    assert torch.count_nonzero(emb.weight.grad[rows[emb.weight]]) == torch.count_nonzero(emb.weight.grad)
    (num, den), = estimators.update_nonlinearity(lin, grads, val, per_parameter=True, rows=rows).values()
    (fn, fd), = estimators.update_nonlinearity(lin, grads, val, per_parameter=True, max_coordinates=10**9).values()
    if tokens * 128 <= 4096:
        assert num == pytest.approx(fn, rel=1e-9, abs=1e-300) and den == pytest.approx(fd, rel=1e-9, abs=1e-300)
    else:
        assert num / den == pytest.approx(fn / fd, rel=0.05)


@pytest.mark.parametrize("shape", [(512, 128), (64, 48, 3), (4096 * 3 + 7,)])
def test_the_sample_stride_walks_every_column_of_a_weight(shape):
    """A stride sharing a factor with the row width would see the same few columns in every row."""
    p = torch.empty(shape)
    stride = _sample_stride(p.numel(), 4096, _row_width(p))
    picked = torch.arange(0, p.numel(), stride)
    assert len(picked) <= 4096 and stride >= -(-p.numel() // 4096)
    assert len(torch.unique(picked % _row_width(p))) == min(_row_width(p), len(picked))
