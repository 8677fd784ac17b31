"""The training's step line fits 80 columns and says what it shows."""

from echoink_lite.console import step_line


def test_step_line_fits_80_columns_at_its_widest():
    m = {"step": 1124, "reward": 1.875, "accuracy": 0.9375, "completion_length": 768.0, "kl": 0.00123,
         "rollout_tokens_per_s": 12345.6, "step_time_s": 1234.5}
    line = step_line(m, 1124, eta_s=123 * 3600 + 59 * 60)
    assert len(line) <= 80, (len(line), line)
    assert line.startswith("[1124/1124] reward 1.88 acc 0.94 len 768 kl 1.2e-3") and line.endswith("eta 123h59m")
    skipped = step_line(dict(m, skipped_step=True), 1124, eta_s=60)
    assert len(skipped) <= 80 and skipped.endswith("NON-FINITE")
    no_kl = step_line(dict(m, kl=None, accuracy=None), 9, eta_s=None)
    assert "kl -" in no_kl and "acc -" in no_kl and "eta" not in no_kl
