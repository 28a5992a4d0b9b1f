"""The toy reach task: rules, rendering, determinism, difficulty; and the make_env registry."""

import sys
import types

import numpy as np
import pytest

from trainer.envs import LIBERO_SUITES, SUITES, make_env
from trainer.envs.toy import (
    AGENT_COLOUR,
    FLOOR_COLOUR,
    NUM_INIT_STATES,
    OUTSIDE_COLOUR,
    TARGET_COLOURS,
    TARGET_POSITIONS,
    ToyReachEnv,
    init_state_position,
    world_to_pixel,
)

RED, GREEN, BLUE = 0, 1, 2


def chunk(*moves: tuple[float, float]) -> np.ndarray:
    """Actions [k, 7] that move by the given (dx, dy) commands and leave the other five dims at 0."""
    actions = np.zeros((len(moves), 7))
    actions[:, :2] = moves
    return actions


def run_episode(env: ToyReachEnv, task_id: int, init_state_id: int, seed: int, policy) -> list:
    env.reset(task_id, init_state_id, seed)
    results = []
    while not results or not results[-1].done:
        results.append(env.step(policy(env)[None]))
    return results


def test_tasks_instructions_and_init_states():
    env = ToyReachEnv()
    assert (env.suite, env.image_pipeline, env.max_steps) == ("toy", "none", 8)
    assert env.num_tasks() == 3
    assert [env.instruction(t) for t in range(3)] == [
        "move to the red target",
        "move to the green target",
        "move to the blue target",
    ]
    assert all(env.num_init_states(t) == NUM_INIT_STATES == 50 for t in range(3))
    starts = np.array([init_state_position(i) for i in range(NUM_INIT_STATES)])
    assert len(np.unique(starts.round(6), axis=0)) == NUM_INIT_STATES  # 50 different places ...
    assert np.linalg.norm(starts, axis=1).max() <= 0.15 + 1e-9  # ... all near the centre


def test_bad_task_or_init_state_is_a_clear_error():
    env = ToyReachEnv()
    with pytest.raises(ValueError, match=r"task_id 3 is out of range.*0=red, 1=green, 2=blue"):
        env.reset(3, 0, seed=0)
    with pytest.raises(ValueError, match="init_state_id 50 is out of range"):
        env.reset(0, 50, seed=0)
    with pytest.raises(ValueError, match="task_id -1"):
        env.instruction(-1)


def test_observation_layout():
    env = ToyReachEnv()
    obs = env.reset(GREEN, 7, seed=3)
    assert obs.primary_image.shape == obs.wrist_image.shape == (32, 32, 3)
    assert obs.primary_image.dtype == obs.wrist_image.dtype == np.uint8
    assert obs.proprio.dtype == np.float32 and obs.proprio.shape == (8,)
    np.testing.assert_allclose(obs.proprio[:2], env.agent_position, atol=1e-6)
    assert np.all(obs.proprio[2:] == 0)
    assert obs.instruction == "move to the green target"


def test_targets_are_drawn_at_their_fixed_places_in_their_colours():
    env = ToyReachEnv()
    for task_id in range(3):
        image = env.reset(task_id, 0, seed=0).primary_image
        for position, colour in zip(TARGET_POSITIONS, TARGET_COLOURS):
            assert tuple(image[world_to_pixel(position)]) == tuple(colour)
        assert tuple(image[world_to_pixel(env.agent_position)]) == tuple(AGENT_COLOUR)
        assert tuple(image[0, 0]) == tuple(FLOOR_COLOUR)  # a corner: floor, nothing else
        # Only the four things are drawn: pure target colours, white agent, grey floor.
        colours = {tuple(c) for c in image.reshape(-1, 3)}
        assert colours == {tuple(c) for c in TARGET_COLOURS} | {tuple(AGENT_COLOUR), tuple(FLOOR_COLOUR)}


def test_agent_pixel_moves_with_the_agent():
    env = ToyReachEnv()
    env.reset(RED, 0, seed=0)
    before = env.agent_position
    image = env.step(chunk((1.0, 0.0), (1.0, 0.0))).observation.primary_image
    after = env.agent_position
    np.testing.assert_allclose(after - before, [0.4, 0.0], atol=1e-12)
    assert tuple(image[world_to_pixel(after)]) == tuple(AGENT_COLOUR)
    assert tuple(image[world_to_pixel(before)]) == tuple(FLOOR_COLOUR)


def pixels_of(image: np.ndarray, colour: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.nonzero(np.all(image == colour, axis=-1))


def test_wrist_view_follows_the_agent():
    env = ToyReachEnv()
    wrist = env.reset(RED, 0, seed=0).wrist_image
    assert tuple(wrist[16, 16]) == tuple(AGENT_COLOUR)  # the agent is always in the middle
    # From the centre the edges of all three targets are in view, each in its own diagonal direction
    # (red up-right, green up-left, blue down-left; image rows grow downwards).
    red_rows, red_cols = pixels_of(wrist, TARGET_COLOURS[RED])
    green_rows, green_cols = pixels_of(wrist, TARGET_COLOURS[GREEN])
    blue_rows, blue_cols = pixels_of(wrist, TARGET_COLOURS[BLUE])
    assert len(red_rows) > 0 and red_rows.max() < 16 and red_cols.min() > 16
    assert len(green_rows) > 0 and green_rows.max() < 16 and green_cols.max() < 16
    assert len(blue_rows) > 0 and blue_rows.min() > 16 and blue_cols.max() < 16
    # Two steps right: green and blue fall out of view, red is still there, up and to the right.
    wrist = env.step(chunk((1.0, 0.0), (1.0, 0.0))).observation.wrist_image
    assert tuple(wrist[16, 16]) == tuple(AGENT_COLOUR)
    assert len(pixels_of(wrist, TARGET_COLOURS[GREEN])[0]) == 0
    assert len(pixels_of(wrist, TARGET_COLOURS[BLUE])[0]) == 0
    red_rows, red_cols = pixels_of(wrist, TARGET_COLOURS[RED])
    assert len(red_rows) > 0 and red_rows.max() < 16
    # At the left wall the left half of the view is outside the arena (black), the right half is floor.
    env.reset(GREEN, 0, seed=0)
    wrist = env.step(chunk(*[(-1.0, 0.0)] * 6)).observation.wrist_image
    assert env.agent_position[0] == -1.0
    # (right of the agent, between the green target above and the blue one below)
    assert np.all(wrist[:, :12] == OUTSIDE_COLOUR) and np.all(wrist[8:24, 20:] == FLOOR_COLOUR)


def test_dynamics_only_dims_0_and_1_move_the_agent_and_actions_are_clipped():
    env = ToyReachEnv()
    env.reset(BLUE, 4, seed=1)
    start = env.agent_position
    actions = chunk((1.0, -0.5))
    actions[0, 2:] = [0.9, -0.9, 0.3, 1.0, -1.0]  # ignored
    env.step(actions)
    np.testing.assert_allclose(env.agent_position - start, [0.2, -0.1], atol=1e-12)
    env.reset(BLUE, 4, seed=1)
    env.step(chunk((5.0, -0.5)))  # outside [-1, 1]: clipped to 1
    np.testing.assert_allclose(env.agent_position - start, [0.2, -0.1], atol=1e-12)


def test_the_agent_stays_inside_the_arena():
    env = ToyReachEnv()
    env.reset(RED, 0, seed=0)
    env.step(chunk(*[(1.0, -1.0)] * 8))
    np.testing.assert_allclose(env.agent_position, [1.0, -1.0])


def test_a_chunk_runs_open_loop_until_the_episode_ends():
    env = ToyReachEnv()
    env.reset(RED, 0, seed=0)
    first = env.step(chunk(*[(0.0, 0.0)] * 3))
    assert (first.steps_executed, first.done, first.reward, first.success) == (3, False, 0.0, False)
    last = env.step(chunk(*[(0.0, 0.0)] * 8))  # only 5 of these 8 fit in the episode
    assert (last.steps_executed, last.done, last.success) == (5, True, False)
    assert last.info["elapsed_steps"] == 8
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(chunk((0.0, 0.0)))


def test_reaching_the_named_target_gives_reward_once_and_ends_the_episode():
    env = ToyReachEnv()
    env.reset(RED, 0, seed=0)  # starts about 0.6 down-left of the red target
    result = env.step(chunk(*[(1.0, 1.0)] * 8))
    assert result.success and result.done and result.reward == 1.0
    assert result.info["distance_to_target"] <= env.success_radius
    # The chunk stopped at the first step within reach: one step fewer is not a success yet.
    needed = result.steps_executed
    assert 2 <= needed < 8 and result.info["elapsed_steps"] == needed
    env.reset(RED, 0, seed=0)
    short = env.step(chunk(*[(1.0, 1.0)] * (needed - 1)))
    assert not short.success and short.reward == 0.0 and short.info["distance_to_target"] > env.success_radius
    # Reaching another colour's target is not success.
    env.reset(GREEN, 0, seed=0)
    result = env.step(chunk((0.0, 1.0), (0.0, 1.0)))
    assert not result.success and result.reward == 0.0 and not result.done


def test_wrong_action_shapes_are_clear_errors():
    env = ToyReachEnv()
    env.reset(RED, 0, seed=0)
    with pytest.raises(ValueError, match=r"shape \[k, 7\].*got \(7,\)"):
        env.step(np.zeros(7))
    with pytest.raises(ValueError, match=r"got \(2, 6\)"):
        env.step(np.zeros((2, 6)))
    with pytest.raises(ValueError, match=r"got \(0, 7\)"):
        env.step(np.zeros((0, 7)))
    with pytest.raises(ValueError, match="NaN"):
        env.step(np.full((1, 7), np.nan))


def test_same_seed_same_episode_and_the_seed_only_jitters_the_start():
    def trajectory(seed: int):
        env = ToyReachEnv()
        rng = np.random.default_rng(99)
        obs = env.reset(BLUE, 11, seed=seed)
        frames, positions = [obs.primary_image], [env.agent_position]
        for _ in range(4):
            result = env.step(rng.uniform(-1, 1, size=(2, 7)))
            frames.append(result.observation.primary_image)
            positions.append(env.agent_position)
            if result.done:
                break
        return np.array(frames), np.array(positions)

    frames_a, positions_a = trajectory(seed=5)
    frames_b, positions_b = trajectory(seed=5)
    np.testing.assert_array_equal(frames_a, frames_b)
    np.testing.assert_array_equal(positions_a, positions_b)
    _, positions_c = trajectory(seed=6)
    assert not np.array_equal(positions_a[0], positions_c[0])
    for positions in (positions_a, positions_c):
        assert np.all(np.abs(positions[0] - init_state_position(11)) <= 0.02)


def test_the_informed_policy_always_succeeds_within_the_episode():
    env = ToyReachEnv()
    lengths = []
    for task_id in range(3):
        for init_state_id in range(NUM_INIT_STATES):
            for seed in range(2):
                results = run_episode(env, task_id, init_state_id, seed, ToyReachEnv.expert_action)
                assert results[-1].success, (task_id, init_state_id, seed)
                assert [r.reward for r in results] == [0.0] * (len(results) - 1) + [1.0]
                lengths.append(len(results))
    assert max(lengths) <= 3 < env.max_steps


def test_a_random_policy_succeeds_rarely_but_sometimes():
    env = ToyReachEnv()
    rng = np.random.default_rng(0)
    episodes = 600
    successes = sum(
        run_episode(env, e % 3, (e // 3) % NUM_INIT_STATES, e, lambda _: rng.uniform(-1, 1, 7))[-1].success
        for e in range(episodes)
    )
    rate = successes / episodes
    # Rare enough that learning shows, common enough that GRPO's first groups have a signal. Measured: ~0.08.
    assert 0.03 <= rate <= 0.15, rate


# --- make_env ------------------------------------------------------------------------------------------------------


def test_make_env_builds_the_toy_env_with_kwargs():
    env = make_env("toy", max_steps=5, step_size=0.1)
    assert isinstance(env, ToyReachEnv) and env.max_steps == 5 and env.step_size == 0.1


def test_make_env_rejects_unknown_suites_and_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown env suite 'libero_100'") as error:
        make_env("libero_100")
    for name in SUITES:
        assert name in str(error.value)


@pytest.mark.parametrize("suite", LIBERO_SUITES)
def test_make_env_routes_libero_suites_to_a_lazily_imported_libero_env(monkeypatch, suite):
    class FakeLiberoEnv:
        def __init__(self, suite, **kwargs):
            self.suite, self.kwargs = suite, kwargs

    fake_module = types.ModuleType("trainer.envs.libero")
    fake_module.LiberoEnv = FakeLiberoEnv
    monkeypatch.setitem(sys.modules, "trainer.envs.libero", fake_module)
    env = make_env(suite, resolution=128)
    assert isinstance(env, FakeLiberoEnv) and env.suite == suite and env.kwargs == {"resolution": 128}


def test_record_frames_returns_the_frame_after_every_action_of_a_chunk():
    env = ToyReachEnv()
    plain = env.reset(RED, 3, seed=5)
    moves = chunk((1, 0), (0, 1), (-1, 0), (0, -1))
    result = env.step(moves)
    assert result.frames is None  # not asked for: one observation per chunk, nothing rendered in between
    env.reset(RED, 3, seed=5, record_frames=True)
    recorded = env.step(moves)
    assert len(recorded.frames) == recorded.steps_executed == 4
    np.testing.assert_array_equal(recorded.frames[-1], recorded.observation.primary_image)
    # frame k is what a chunk of the first k actions would have ended on
    for k in range(1, 5):
        env.reset(RED, 3, seed=5)
        np.testing.assert_array_equal(recorded.frames[k - 1], env.step(moves[:k]).observation.primary_image)
    assert plain.primary_image.shape == recorded.frames[0].shape
    # the flag holds for one episode only
    env.reset(RED, 3, seed=5)
    assert env.step(moves).frames is None


def test_record_frames_stops_at_the_action_that_ends_the_episode():
    env = ToyReachEnv()
    env.reset(BLUE, 0, seed=1, record_frames=True)
    result = env.step(np.stack([env.expert_action()] * 8))  # reaches the target within 3 actions
    assert result.success and result.steps_executed < 8
    assert len(result.frames) == result.steps_executed
