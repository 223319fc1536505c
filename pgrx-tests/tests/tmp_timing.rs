use std::time::Instant;
use rbucardo_cluster_tests::Cluster;
#[test]
fn timing() {
    let t = Instant::now();
    let c = Cluster::builder("timing").nodes(3).preload(false).start();
    eprintln!("start {:?}", t.elapsed());
    let t = Instant::now();
    for n in c.nodes() { n.query_one("postgres", "SELECT 1"); }
    eprintln!("query {:?}", t.elapsed());
    let t = Instant::now();
    drop(c);
    eprintln!("drop {:?}", t.elapsed());
}
