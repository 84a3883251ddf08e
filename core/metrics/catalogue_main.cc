// Prints the metric catalogue as the Markdown tables that docs/metrics.md holds between its
// catalogue markers, so the docs are regenerated rather than edited by hand.
#include <iostream>

#include "core/metrics/host_metrics.h"

int main() {
  std::cout << memsnap::metrics::catalogue_markdown();
  return 0;
}
