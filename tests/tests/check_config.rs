//! `slb check-config` accepts the test config and rejects bad fields, naming them.

use std::process::Command;

use slb_tests::slb::slb_binary;
use slb_tests::SlbConfig;

fn check_config(text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("slb.toml");
    std::fs::write(&path, text).expect("write config");
    let out = Command::new(slb_binary())
        .arg("check-config")
        .arg(&path)
        .output()
        .expect("run slb check-config");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn check_config_accepts_good_and_names_bad_fields() {
    let good = SlbConfig::standard("cc", &[1, 2, 3]);
    let (ok, out) = check_config(&good.to_toml());
    assert!(ok, "a valid config was rejected:\n{out}");

    let mut not_prime = good.clone();
    not_prime.maglev_table_size = 65536;
    let (ok, out) = check_config(&not_prime.to_toml());
    assert!(
        !ok,
        "maglev_table_size 65536 (not prime) was accepted:\n{out}"
    );
    assert!(
        out.contains("maglev_table_size"),
        "error does not name the field:\n{out}"
    );

    let mut bad_protocol = good.to_toml_value();
    *bad_protocol
        .get_mut("listeners")
        .and_then(|l| l.get_mut(1))
        .and_then(|l| l.get_mut("protocol"))
        .expect("listeners[1].protocol") = toml::Value::String("sctp".to_owned());
    let (ok, out) = check_config(&toml::to_string(&bad_protocol).expect("render TOML"));
    assert!(!ok, "protocol sctp was accepted:\n{out}");
    assert!(
        out.contains("protocol"),
        "error does not name the field:\n{out}"
    );
}
