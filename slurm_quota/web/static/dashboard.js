// slurm-quota dashboard: show "last updated" times in the viewer's time zone (the page is
// rendered with UTC times so that it reads correctly without JavaScript too).
(function () {
  "use strict";
  function pad(n) { return (n < 10 ? "0" : "") + n; }
  var nodes = document.querySelectorAll("time[datetime]");
  for (var i = 0; i < nodes.length; i++) {
    var d = new Date(nodes[i].getAttribute("datetime"));
    if (isNaN(d.getTime())) { continue; }
    nodes[i].textContent = d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) +
      " " + pad(d.getHours()) + ":" + pad(d.getMinutes());
    nodes[i].title = nodes[i].getAttribute("datetime");
  }
}());
