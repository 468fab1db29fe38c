#!/usr/bin/env python3
"""A tiny kit worker for the tests: answers loadgen's payload {"amount":A,"n":N} with "n=N", and raises
ValueError("no answer for n=N") when N % fail_mod == fail_rem. --mode batch serves a predict_batch that
raises for the whole batch when any request in it fails (the kit then answers each request alone)."""

import argparse
import json
import logging
import time

from switchyard_worker import serve


def answer(request, fail_mod, fail_rem):
    n = json.loads(request["payload"])["n"]
    if fail_mod and n % fail_mod == fail_rem:
        raise ValueError(f"no answer for n={n}")
    return f"n={n}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--mode", choices=["one", "batch"], default="one")
    parser.add_argument("--fail-mod", type=int, default=0)
    parser.add_argument("--fail-rem", type=int, default=0)
    parser.add_argument("--sleep-ms", type=int, default=0, help="time each batch takes")
    args = parser.parse_args()

    if args.mode == "one":
        def predict(request):
            return answer(request, args.fail_mod, args.fail_rem)
        serve(args.model, predict)
    else:
        def predict_batch(requests):
            if args.sleep_ms:
                # The SIGTERM test checks that a signal arriving in here lets the batch finish.
                logging.info("batch of %d started", len(requests))
                time.sleep(args.sleep_ms / 1000)
                logging.info("batch of %d done", len(requests))
            return [answer(r, args.fail_mod, args.fail_rem) for r in requests]
        serve(args.model, predict_batch=predict_batch)


if __name__ == "__main__":
    main()
