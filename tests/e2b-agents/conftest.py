"""Points the OpenAI Agents SDK's E2B provider, and the e2b client it pins, at a `nook serve`
(tests/nook_test_server.py: the one scripts/test.sh started for all SDK suites, or one of this suite's own).

This suite runs in its own venv (.venv-agents): `openai-agents[e2b]` pins e2b 2.31.0, older than the e2b of
tests/e2b. The provider gets nothing but the three environment variables a user would set (E2B_API_URL,
E2B_SANDBOX_URL, E2B_API_KEY). Every sandbox still alive at the end is killed through the API. No model is called.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nook_test_server import sdk_environment  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def nook_server(request):
    unset = ("E2B_ACCESS_TOKEN", "E2B_VALIDATE_API_KEY", "OPENAI_API_KEY")
    failed = lambda: request.session.testsfailed > 0  # noqa: E731
    with sdk_environment("nook-e2b-agents-test-", unset=unset, failed=failed) as url:
        yield url
