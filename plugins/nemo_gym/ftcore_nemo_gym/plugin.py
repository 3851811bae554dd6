"""Hook implementations of the `nemo_gym` plugin (light: no torch, no HTTP at import)."""

from __future__ import annotations

from ftcore.hookspecs import hookimpl

from ftcore_nemo_gym.config import NemoGymSection, check


class GymServerDown(RuntimeError):
    """A Gym server stayed down: the run stopped after saving a checkpoint."""


def gym_reward(completions, **columns):
    """The ``nemo_gym`` reward: a name for grpo; the values come from Gym through the plugin's producer."""
    raise RuntimeError(
        'the nemo_gym reward is computed by Gym: add a [nemo_gym] table (url = "http://HEAD:11000" or '
        "auto_start = true) to the config"
    )


@hookimpl
def config_section():
    return NemoGymSection


@hookimpl
def register_formats(register):
    register("nemo_gym", "ftcore_nemo_gym.data:NemoGymTasks")


@hookimpl
def register_rewards(register):
    register("nemo_gym", "ftcore_nemo_gym.plugin:gym_reward")


@hookimpl
def validate_config(config):
    check(config)


@hookimpl
def trainer_callbacks(config, run):
    if not config.nemo_gym.enabled:
        return None
    from transformers import TrainerCallback

    class StopWhenGymIsDown(TrainerCallback):
        """Saves a checkpoint after the step whose rollout found a server down, then stops the run."""

        def on_step_end(self, args, state, control, **kwargs):
            if run.stash.get("nemo_gym", {}).get("down"):
                control.should_save = True
                control.should_training_stop = True

        def on_save(self, args, state, control, **kwargs):
            message = run.stash.get("nemo_gym", {}).get("down")
            if message:
                raise GymServerDown(message)

    return [StopWhenGymIsDown()]


@hookimpl(optionalhook=True)
def grpo_rollout_producer(run, generator, scorer, sampling):
    gym = run.config.nemo_gym
    if not gym.enabled:
        return None
    import atexit
    import os

    from ftcore_nemo_gym.launcher import GymLauncher
    from ftcore_nemo_gym.producer import Deployment, EpisodeProducer, VerifyProducer

    launcher = None
    url = gym.url
    if gym.auto_start:
        launcher = GymLauncher(gym, run.output_dir / "nemo-gym.log")
        atexit.register(launcher.stop)  # also when the run fails before training ends
        url = launcher.start()
    try:
        deployment = Deployment(url, gym)
    except Exception:
        if launcher is not None:
            launcher.stop()
        raise
    rank = int(os.environ.get("RANK", "0"))
    producer = (EpisodeProducer if gym.multi_turn else VerifyProducer)(
        generator, scorer, sampling, seed=run.config.train.seed, rank=rank, deployment=deployment, run=run
    )
    producer.launcher = launcher
    return producer
