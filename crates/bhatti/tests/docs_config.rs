//! docs/config.md must show exactly the config the code documents.
//! Regenerate with `BHATTI_BLESS=1 cargo test -p bhatti --test docs_config`.

const HEADER: &str = "# Daemon configuration

`bhatti serve --config /etc/bhatti/config.toml` (or `BHATTI_CONFIG`). Every
key is optional; this is the full file with every default, generated from
the code (`Config::example_toml`). Unknown keys are an error, and values are
checked at start-up with errors that name the key.

```toml
";

#[test]
fn config_doc_matches_the_code() {
    let expected = format!("{HEADER}{}```\n", bhatti::config::Config::example_toml());
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/config.md");
    if std::env::var_os("BHATTI_BLESS").is_some() {
        std::fs::write(&path, &expected).expect("write docs/config.md");
    }
    let actual = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        actual == expected,
        "docs/config.md is out of date: run BHATTI_BLESS=1 cargo test -p bhatti --test docs_config"
    );
}
