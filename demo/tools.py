"""The demo model's tool, to try it by hand: made-up weather (the demo taught the model to call get_weather and repeat
what it says; its schema, from this signature and docstring, is demo/curriculum.py's WEATHER_SCHEMA).

    python eval_model.py --model_path out/demo/tools --tools demo/tools.py:get_weather --temperature 0
"""

import random
import re

from demo.curriculum import WEATHER


def get_weather(city: str) -> str:
    """Today's weather in a city."""
    chinese = bool(re.search(r"[\u4e00-\u9fff]", city))
    return random.choice(WEATHER)[0 if chinese else 1]
