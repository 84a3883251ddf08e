// The dependency of missing_dep.cc, built where the loader will not look.
__attribute__((visibility("default"))) int memsnap_fixture_dep_value() { return 42; }
