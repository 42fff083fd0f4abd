"""Command-line tools of the pack (run with `python -m easyanimate_reward.tools.<name>`)."""
