"""The tagging job: plan the shards (`plan`), read and decode ahead of the model (`loader`), run it
(`engine`), and the job's steps from source to output (`job`).
"""
