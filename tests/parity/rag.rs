use crate::common::{Checker, Fixture};

pub fn check(_fx: &Fixture, _c: &mut Checker) {}
