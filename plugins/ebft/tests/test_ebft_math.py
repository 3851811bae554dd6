"""Rewards, whitening, pooling, layer choice and advantages against values computed by hand."""

import math

import pytest
import torch
from ftcore_ebft.features import layer_indices, pool, whiten
from ftcore_ebft.reward import advantages, conversation_rewards, group_rewards


def test_reward_terms_and_cfm_loss_match_hand_computed_values():
    generated = torch.tensor([[3.0, 4.0], [4.0, 3.0], [0.0, 5.0]])
    out = group_rewards(generated, torch.tensor([0.0, 1.0]), alignment_coef=0.5, diversity_coef=0.25)
    # cos with (0, 1): 4/5, 3/5, 1; mean dot with the others: (24+20)/2, (24+15)/2, (20+15)/2
    assert out.alignment.tolist() == pytest.approx([0.8, 0.6, 1.0])
    assert out.diversity.tolist() == pytest.approx([22.0, 19.5, 17.5])
    # 2 * 0.5 * alignment - 2 * 0.25 * diversity
    assert out.rewards.tolist() == pytest.approx([0.8 - 11.0, 0.6 - 9.75, 1.0 - 8.75])
    # |(7/3, 4) - (0, 1)|^2 = 49/9 + 9
    assert out.cfm_loss == pytest.approx(130 / 9)


def test_a_multi_turn_group_scores_each_conversation_by_its_mean_turn_feature():
    generated = [torch.tensor([[4.0, 0.0], [2.0, 4.0]]), torch.tensor([[0.0, 4.0]])]  # 2 turns; cut after 1
    reference = torch.tensor([[0.0, 2.0], [2.0, 0.0]])
    out = conversation_rewards(generated, reference, alignment_coef=1.0, diversity_coef=0.5)
    # means (3, 2) and (0, 4) against the reference mean (1, 1): cos 5/sqrt(26) and 1/sqrt(2); dot 8
    assert out.alignment.tolist() == pytest.approx([5 / math.sqrt(26), 1 / math.sqrt(2)])
    assert out.diversity.tolist() == pytest.approx([8.0, 8.0])
    assert out.rewards.tolist() == pytest.approx([10 / math.sqrt(26) - 8, math.sqrt(2) - 8])
    # |(1.5, 3) - (1, 1)|^2
    assert out.cfm_loss == pytest.approx(0.25 + 4)


def test_a_single_sample_has_no_diversity_term():
    out = group_rewards(torch.tensor([[3.0, 4.0]]), torch.tensor([6.0, 8.0]), 1.0, 1.0)
    assert out.diversity.tolist() == [0.0]
    assert out.rewards.tolist() == pytest.approx([2.0])


def test_whitening_rescales_the_generated_directions_and_applies_to_the_reference():
    generated, reference = whiten(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([2.0, 2.0]))
    assert generated.flatten().tolist() == pytest.approx([1.0, 0.0, 0.0, 1.0], abs=1e-6)  # W = diag(1/2, 1)
    assert reference.tolist() == pytest.approx([1.0, 2.0], abs=1e-6)
    # rank 1: W = e1 e1^T / sqrt(5); the reference keeps only its e1 part
    generated, reference = whiten(
        torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0]]), torch.tensor([1.0, 1.0, 1.0])
    )
    s = math.sqrt(5)
    assert generated.flatten().tolist() == pytest.approx([1 / s, 0, 0, 2 / s, 0, 0], abs=1e-6)
    assert reference.tolist() == pytest.approx([1 / s, 0, 0], abs=1e-6)
    whitened = group_rewards(
        torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([2.0, 2.0]), 1.0, 1.0, use_whitening=True
    )
    assert whitened.alignment.tolist() == pytest.approx([1 / math.sqrt(5), 2 / math.sqrt(5)], abs=1e-6)
    assert whitened.diversity.tolist() == pytest.approx([0.0, 0.0], abs=1e-6)


def test_pooling_methods_pick_the_hand_chosen_tokens():
    states = torch.arange(6.0).reshape(1, 6, 1)  # token t has state t; token 5 is padding
    ends, starts = torch.tensor([5]), torch.tensor([1])
    assert pool(states, ends, starts, "last_token").tolist() == [[4.0]]
    assert pool(states, ends, starts, "mean_pooling").tolist() == [[2.0]]
    assert pool(states, ends, starts, "completion_mean").tolist() == [[2.5]]
    # completion tokens 1..4: 25% / 50% / 75% of the way from the first to the last -> 1, 2, 3
    assert pool(states, ends, starts, "concat").tolist() == [[1.0, 2.0, 3.0]]


def test_feature_layers_are_fractions_of_depth():
    assert layer_indices(32, [0.25, 0.5, 0.75]) == [8, 16, 24]
    assert layer_indices(5, [0.25, 0.5, 0.75, 1.0]) == [1, 2, 4, 5]
    assert layer_indices(5, [0.01]) == [1]


def test_advantage_estimators():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    assert advantages(rewards, "rloo")[0].tolist() == pytest.approx([-8 / 3, -4 / 3, 0.0, 4.0])
    std = math.sqrt(14 / 3)
    assert advantages(rewards, "group_norm")[0].tolist() == pytest.approx(
        [-2 / std, -1 / std, 0.0, 3 / std], rel=1e-5
    )
    assert advantages(rewards, "reinforce").tolist() == [[1.0, 2.0, 3.0, 6.0]]
    assert advantages(torch.tensor([[5.0]]), "rloo").tolist() == [[5.0]]  # n = 1: reinforce
    assert advantages(torch.tensor([[5.0]]), "group_norm").tolist() == [[5.0]]
