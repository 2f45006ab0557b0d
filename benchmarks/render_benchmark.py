"""How many regular 5-note digest emails one core renders per second.

    python benchmarks/render_benchmark.py [-n 2000]

The process is pinned to one CPU (where the OS allows it). Each email goes through everything a real
send does before the provider call: excerpting five realistic notes (front matter, metadata, wiki
links, images, links, HTML, lists, quotes, code, a note over the 900-character budget), Jinja
rendering of the HTML and text templates, and CSS inlining. Target: ≥ 500 emails/second/core.
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import date, timedelta

from dbb_orchestration.digests.render import DigestEmailContext, DigestNote, render_digest_email

NOTE_A = """---
title: Spaced repetition
tags: [learning, memory]
created: 2024-03-02
---
tags:: #learning
status:: evergreen

# Spaced repetition

The **spacing effect**: we remember things better when reviews are spread out over time rather than
crammed. See [[Ebbinghaus forgetting curve|the forgetting curve]] and [[Active recall]].

> [!quote] Piotr Wozniak
> Memory is not a recording; it is a reconstruction.

- Review right before you would forget
- Short, frequent sessions beat long ones
- [ ] Try a weekly review of old notes

More: [SuperMemo article](https://www.supermemo.com/en/blog/spaced-repetition) and https://ncase.me/remember/
"""

NOTE_B = """aliases: [Deep Work]
# Deep work, Cal Newport

![cover](https://images.example.com/deep-work.jpg)

<div class="callout">Professional activities performed in a state of <b>distraction-free</b> concentration
that push your cognitive capabilities to their limit.</div>

1. Work deeply
2. Embrace boredom
3. Quit social media
4. Drain the shallows

rating:: 4
source:: [[Books]]

Schedule every minute of your day. Use a shutdown ritual: "Schedule shutdown, complete."
"""

NOTE_C = """## Python tip: functools.cache

```python
import functools

@functools.cache
def fib(n: int) -> int:
    return n if n < 2 else fib(n - 1) + fib(n - 2)
```

Unbounded, thread-safe, and keyed on the arguments. Use `lru_cache(maxsize=...)` when memory matters.
Docs: <https://docs.python.org/3/library/functools.html#functools.cache>
"""

NOTE_D = (
    "Meeting notes &amp; ideas\n\n"
    + " ".join(
        f"Sentence {i} about the quarterly planning offsite, where we discussed roadmap trade-offs, hiring "
        "and the migration to the new data platform."
        for i in range(12)
    )
    + "\n\n- follow up with design\n- share the [doc](https://docs.example.com/plan?q=1&v=2)\n"
)

NOTE_E = """Small things done consistently beat big things done occasionally.
![[habit-loop.png]]
%% private: check source %%
"""


def build_context(index: int) -> DigestEmailContext:
    return DigestEmailContext(
        user_name=f"Reader {index}",
        digest_date=date(2026, 2, 8) + timedelta(days=index % 30),
        interval_days=7,
        is_first=False,
        is_pro=index % 2 == 0,
        notes=[
            DigestNote("Spaced repetition", NOTE_A, "obsidian", None),
            DigestNote("Deep Work <notes>", NOTE_B, "notion", "Book Notes"),
            DigestNote("functools.cache", NOTE_C, "obsidian", "Work vault"),
            DigestNote(None, NOTE_D, "notion", "Team Wiki"),
            DigestNote("Habits", NOTE_E, None, None),
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--count", type=int, default=2000, help="emails to render (default 2000)")
    args = parser.parse_args()

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    contexts = [build_context(i) for i in range(args.count)]
    render_digest_email(contexts[0], "https://app.example.com")  # warm-up: templates, inliner

    started = time.perf_counter()
    total_bytes = 0
    for ctx in contexts:
        email = render_digest_email(ctx, "https://app.example.com")
        total_bytes += len(email.html) + len(email.text)
    elapsed = time.perf_counter() - started

    rate = args.count / elapsed
    print(
        f"rendered {args.count} five-note digests in {elapsed:.3f}s on one core: {rate:,.0f} emails/second "
        f"({elapsed / args.count * 1000:.2f} ms each, {total_bytes / args.count / 1024:.1f} KiB html+text)"
    )


if __name__ == "__main__":
    main()
