"""schemathesis hooks for crates/bhatti/tests/api_fuzz.rs: one extra check."""

import schemathesis


@schemathesis.check
def error_body(ctx, response, case):
    """Every 4xx answers with a JSON object {"error": "<message>"}."""
    # HEAD answers have no body by definition.
    if case.method.upper() != "HEAD" and 400 <= response.status_code < 500:
        try:
            body = response.json()
        except Exception:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("error"), str):
            raise AssertionError(
                f"{response.status_code} without a JSON {{\"error\"}} body: {response.text[:200]!r}"
            )
