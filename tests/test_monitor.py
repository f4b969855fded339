"""The training console (lrkv/training/monitor.py): the progress bar of optimizer steps."""


def test_progress_bar_shows_the_last_validation_at_the_end(capsys):
    """The last step validates after its bar update: the bar must show that validation, not the one before."""
    from lrkv.training.monitor import StepProgress

    bar = StepProgress(total_steps=4, start_step=0, tokens_per_step=8)
    bar.update(2, 3.0)
    bar.validated(2.5)
    bar.update(4, 2.0)
    bar.validated(1.25)  # the final validation
    bar.close()
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert "val=1.2500" in last and "loss=2.0000" in last and "4/4" in last
