"""Experiment tracking (wandb or SwanLab, rank 0 only) and the loss-curve PNG."""

import os
from pathlib import Path


class Tracker:
    """`backend`: "none", "wandb" (honours WANDB_MODE=online|offline|disabled) or "swanlab" (for users who cannot
    reach wandb; honours SWANLAB_MODE). The run id is kept in the resume state, so --resume continues the same run."""

    def __init__(self, backend: str, project: str, run_name: str, config: dict, log_dir, run_id: str | None = None):
        self.backend, self.run_id, self.run = backend, run_id, None
        if backend == "wandb":
            import wandb

            Path(log_dir).mkdir(parents=True, exist_ok=True)
            # pass the mode on explicitly: wandb reads the environment only once per process
            self.run = wandb.init(project=project, name=run_name, config=config, dir=str(log_dir), id=run_id,
                                  resume="allow" if run_id else None, mode=os.environ.get("WANDB_MODE", "online"))
            self.run_id = getattr(self.run, "id", None)
        elif backend == "swanlab":
            import swanlab

            Path(log_dir).mkdir(parents=True, exist_ok=True)
            kwargs = dict(project=project, name=run_name, config=config, log_dir=str(Path(log_dir) / "swanlog"),
                          mode=os.environ.get("SWANLAB_MODE"))  # online (after `swanlab login`), offline, disabled
            if run_id:
                kwargs.update(id=run_id, resume="allow")
            self.run = swanlab.init(**kwargs)
            self.run_id = getattr(self.run, "id", None)
        elif backend != "none":
            raise ValueError(f"unknown logger {backend!r}; choose none, wandb or swanlab")

    def log(self, metrics: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


def plot_loss(history: list, path, title: str, ylabel: str = "loss", held_out=()) -> None:
    """history: [(step, value), ...] -> a PNG of the raw curve and its moving average (+ the held-out points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    steps, losses = zip(*history)
    k = max(1, len(losses) // 20)
    smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, losses, alpha=0.35, label=ylabel)
    ax.plot(steps, smooth, label=f"moving average ({k})")
    if held_out:
        ax.plot(*zip(*held_out), "o-", color="tab:red", label="held-out")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def save_figure(fig, path) -> None:
    """Write a matplotlib figure aside and rename it: a crash mid-write never leaves half a PNG under the name."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
