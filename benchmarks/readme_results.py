"""Rewrite the README's results tables from the committed reproduce outputs
(fastfair.results_summary): run after committing a finished cell, so that the
README shows what benchmarks/results/*/results.json holds."""
import os
import sys

if __name__ == "__main__":
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, repo)
    from fastfair.results_summary import rewrite

    path = os.path.join(repo, "README.md")
    with open(path, encoding="utf-8") as f:
        old = f.read()
    new = rewrite(old, repo)
    if new != old:
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)
    print("README.md " + ("rewritten" if new != old else "already up to date"))
