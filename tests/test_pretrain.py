"""Pretraining the default small CNN on digits (the session's shared fixture)."""


def test_small_cnn_reaches_95_percent_on_digits(pretrained_state):
    _, result = pretrained_state
    assert result.test_metrics["cls/acc"] >= 0.95
    assert len(result.val_acc) == len(result.epoch_losses) == 20
    assert result.epoch_losses[-1] < result.epoch_losses[0] / 5
    assert result.val_acc[-1] >= 0.95
