"""Runtime: loads artifacts and runs them with numpy (and the TVM runtime); never imports torch or the compiler."""
