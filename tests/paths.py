"""Where things are, for tests in any folder under tests/."""

from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
DOCS = REPO / "docs"
SHARED_DATA = REPO.parent / "shared" / "data"  # ../shared/data beside the checkout
