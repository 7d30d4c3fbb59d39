"""`python -m sweep.schedules <overrides>`: draw schedules without training (see draw.py)."""

from sweep.schedules.draw import main

main()
