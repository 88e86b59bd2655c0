import pytest

from depthcut import Analysis, DepthcutError, select


def _analysis(num_layers=6):
    """A hand-made analysis whose answers are known: block [2, 2+n) is always the closest."""
    matrix = [
        [(0.01 * n if first == 2 else 0.5 + 0.01 * first) if first + n <= num_layers else None for first in range(num_layers)]
        for n in range(1, num_layers + 1)
    ]
    # The final layer's block (first + n = L) is even closer: it must still never be chosen.
    for n in range(1, num_layers):
        matrix[n - 1][num_layers - n] = 0.0
    influence = [0.9, 0.2, 0.05, 0.3, 0.01, 0.4]
    return Analysis(num_layers, {"angular_last_token": matrix, "block_influence": influence})


def test_deepest_takes_the_layers_before_the_last():
    assert select("deepest", 3, num_layers=30) == [26, 27, 28]


def test_angular_takes_the_closest_block_that_keeps_the_final_layer():
    analysis = _analysis()
    assert select("angular", 2, analysis=analysis) == [2, 3]
    assert select("angular", 3, analysis=analysis) == [2, 3, 4]
    assert select("angular", 5, analysis=analysis) == [0, 1, 2, 3, 4]  # only block left without layer 5


def test_block_influence_takes_the_least_influential_layers():
    assert select("block-influence", 2, analysis=_analysis()) == [2, 4]


@pytest.mark.parametrize("drop", [0, 6, -1])
def test_drop_out_of_range(drop):
    with pytest.raises(DepthcutError, match="between 1 and 5"):
        select("deepest", drop, num_layers=6)


def test_unknown_strategy_suggests_the_closest():
    with pytest.raises(DepthcutError, match="Did you mean 'deepest'"):
        select("deepst", 2, num_layers=6)


def test_analysis_strategies_need_an_analysis_of_the_same_model():
    with pytest.raises(DepthcutError, match="needs an analysis"):
        select("angular", 2, num_layers=6)
    with pytest.raises(DepthcutError, match="6 layers, this model has 30"):
        select("angular", 2, num_layers=30, analysis=_analysis())


def test_random_block_is_seeded_contiguous_and_keeps_the_final_layer():
    blocks = {tuple(select("random", 5, num_layers=30, seed=s)) for s in range(20)}
    assert len(blocks) > 3
    for block in blocks:
        assert list(block) == list(range(block[0], block[0] + 5)) and block[-1] <= 28
    assert select("random", 5, num_layers=30, seed=3) == select("random", 5, num_layers=30, seed=3)
