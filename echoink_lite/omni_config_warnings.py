"""Quiet transformers' false alarm about the Qwen2.5-Omni talker's token ids, and nothing else.

Every load or save of a complete Qwen2.5-Omni config (the Hub checkpoint's `config.json`) logged seven
warnings with transformers 5.23, e.g. "Model config: tts_text_start_token_id must be `None` or an integer
within the vocabulary (between 0 and 8447), got 151860". They are wrong about these configs:

- `PreTrainedConfig.validate_token_ids` (transformers configuration_utils.py) checks every `*_token_id` of a
  config against that config's own `vocab_size`. The talker's `vocab_size` is its speech codec's (8448 rows),
  but its `tts_text_{start,end,pad}_token_id`, `vision_{start,end}_token_id` and `audio_{start,end}_token_id`
  are ids of the THINKER's text vocabulary (152,064 rows): `Qwen2_5OmniForConditionalGeneration.generate`
  looks them up in the thinker's embedding (`thinker_embed_tokens(...)`, models/qwen2_5_omni/
  modeling_qwen2_5_omni.py). So every real talker config "fails" the check.
- Worse, most of the seven come from a config nobody wrote: `to_diff_dict` builds a default
  `Qwen2_5OmniTalkerConfig()` to diff against (`recursive_diff_dict`), and `from_dict` formats
  `logger.info(f"Model config {config}")` even when info is not shown; the class's own defaults
  (tts ids 151859-151861 against `vocab_size` 8448) trip the check.

The filter drops a record only when all of these hold: it is that message, about one of those seven ids,
logged by `validate_token_ids` running on a `Qwen2_5OmniTalkerConfig`. The same message about any other
config or id (the thinker's `pad_token_id`, say) still shows. Installed when the package is imported.
"""

from __future__ import annotations

import logging
import re
import sys

CONFIG_LOGGER = "transformers.configuration_utils"
TALKER_IDS_IN_THINKER_VOCAB = frozenset({
    "tts_text_start_token_id", "tts_text_end_token_id", "tts_text_pad_token_id",
    "vision_start_token_id", "vision_end_token_id", "audio_start_token_id", "audio_end_token_id",
})
_MESSAGE = re.compile(r"Model config: (\w+) must be `None` or an integer within the vocabulary")


def _checked_config_class() -> str | None:
    """Class name of the config whose `validate_token_ids` is running on this thread's stack, if any."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "validate_token_ids" and "self" in frame.f_locals:
            return type(frame.f_locals["self"]).__name__
        frame = frame.f_back
    return None


class DropTalkerTokenIdFalseAlarm(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        match = _MESSAGE.match(str(record.msg))
        if match is None or match.group(1) not in TALKER_IDS_IN_THINKER_VOCAB:
            return True
        return _checked_config_class() != "Qwen2_5OmniTalkerConfig"


def install() -> None:
    logger = logging.getLogger(CONFIG_LOGGER)
    if not any(isinstance(f, DropTalkerTokenIdFalseAlarm) for f in logger.filters):
        logger.addFilter(DropTalkerTokenIdFalseAlarm())
